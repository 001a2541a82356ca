"""One module per editing method, over the shared mechanics in the package root."""
