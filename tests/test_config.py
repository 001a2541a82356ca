"""Strict recipes and typed configs."""

from __future__ import annotations

import dataclasses
import tomllib

import pytest

from peftedit import ImagicConfig, NullTextConfig, PeftEditError, RuntimeConfig, build
from peftedit.commands import recipe_sections
from peftedit.config import RECIPES_DIR, field_kinds, option

SECTIONS = {"runtime": RuntimeConfig, "imagic": ImagicConfig}


def test_overrides_reach_the_right_table_and_type():
    configs = build(SECTIONS, None, ["lora_rank=16", "imagic.eta=0.6", "runtime.dtype=bf16", "embedding_lr=1"])
    assert configs["imagic"].lora_rank == 16 and configs["imagic"].eta == 0.6
    assert configs["imagic"].embedding_lr == 1.0 and isinstance(configs["imagic"].embedding_lr, float)
    assert configs["runtime"].dtype == "bf16"


@pytest.mark.parametrize(
    "override, message",
    [
        ("imagic.lora_rnak=4", "unknown key imagic.lora_rnak"),
        ("nosuch=1", r"^--set \(overrides\) nosuch: is not a known key"),
        ("seed", r"^--set \(overrides\) 'seed': expected key=value$"),
        (" =3", r"^--set \(overrides\) ' =3': expected key=value$"),  # it said "--set : is not a known key"
        ("tables.eta=1", r"^--set \(overrides\) tables.eta: unknown table 'tables'"),
        ("imagic.lora_rank=big", "imagic.lora_rank = 'big' must be an integer"),
        ("imagic.lora_rank=2.5", "must be an integer"),
        ("imagic.lora_rank=0", "must be > 0"),
        ("imagic.lora_rank=true", "imagic.lora_rank = True must be an integer"),  # a bool is no count
        ("imagic.lora_targets=['attention','mlp']", r"lora_targets = \['attention', 'mlp'\]: choose from attention, "),
        ("runtime.dtype=fp8", "not one of"),
        ("runtime.device=cuda:abc", r"runtime.device = 'cuda:abc': a CUDA device is cuda or cuda:N"),
        ("runtime.device=cuda:", r"runtime.device = 'cuda:': a CUDA device is cuda or cuda:N"),
        ("runtime.device=cuda:-1", r"a CUDA device is cuda or cuda:N"),
        ("gradient_checkpointing=1", "must be true or false"),
        ("imagic.eta=nan", r"imagic.eta = nan must be a finite number"),
        ('imagic.preview_etas=["a"]', r"imagic.preview_etas\[0\] = 'a' must be a number"),
        ("imagic.preview_etas=[0.5, inf]", r"imagic.preview_etas\[1\] = inf must be a finite number"),
        ("imagic.preview_etas=0.5", "imagic.preview_etas = 0.5 must be a list"),
        ("imagic.preview_etas=[]", r"imagic.preview_etas = \[\]: the preview needs at least one eta"),
        ("imagic.lora_targets=[1]", r"imagic.lora_targets\[0\] = 1 must be a string"),
        ("runtime.seed=99999999999999999999999", "runtime.seed = 99999999999999999999999 is out of range"),
        ("runtime.seed=-1", "runtime.seed = -1 is out of range"),
        ("imagic.preview_seed=18446744073709551616", "imagic.preview_seed = .* is out of range"),
    ],
)
def test_bad_overrides_raise_naming_the_key(override, message):
    with pytest.raises(PeftEditError, match=message):
        build(SECTIONS, None, [override])


def test_one_override_string_is_refused_not_read_letter_by_letter():
    with pytest.raises(TypeError, match="^overrides must be a list of 'key=value' strings, not one string"):
        build(SECTIONS, None, "imagic.lora_rank=16")
    assert build(SECTIONS, None, ["imagic.lora_rank=16"])["imagic"].lora_rank == 16


def test_unknown_recipe_key_and_table_are_errors(tmp_path):
    bad_key = tmp_path / "bad.toml"
    bad_key.write_text("[imagic]\nembedding_step = 10\n")
    with pytest.raises(PeftEditError, match="unknown key imagic.embedding_step"):
        build(SECTIONS, bad_key)
    bad_table = tmp_path / "table.toml"
    bad_table.write_text("[imagic_v2]\neta = 0.5\n")
    with pytest.raises(PeftEditError, match=r"unknown table \[imagic_v2\]"):
        build(SECTIONS, bad_table)
    with pytest.raises(PeftEditError, match="not found"):
        build(SECTIONS, "no-such-recipe")


def test_a_plain_value_where_a_table_belongs_is_refused(tmp_path):
    """`imagic = 5` crashed in dict.update had the check gone; a list of pairs would have been taken as a table."""
    recipe = tmp_path / "scalar.toml"
    for text, shown in (("imagic = 5", "5"), ('imagic = [["eta", 0.5]]', r"\[\['eta', 0.5\]\]")):
        recipe.write_text(text + "\n")
        with pytest.raises(PeftEditError, match=rf"scalar.toml: imagic = {shown} is not a table; put its keys under"):
            build(SECTIONS, recipe)


def test_a_key_two_tables_have_must_name_its_table():
    """`--set guidance=3` took the first table that has it (imagic) when the check only refused unknown keys."""
    for key in ("guidance", "seed"):  # imagic and nulltext; runtime and nulltext
        with pytest.raises(PeftEditError, match=rf"^--set \(overrides\) {key}: is ambiguous; write it as table.key"):
            build(recipe_sections(), None, [f"{key}=3"])
    assert build(recipe_sections(), None, ["nulltext.guidance=3"])["nulltext"].guidance == 3.0


def test_every_shipped_recipe_loads():
    recipes = sorted(RECIPES_DIR.glob("*.toml"))
    assert recipes
    from peftedit.demo.train import SECTIONS as TRAIN_SECTIONS

    for path in recipes:
        tables = set(tomllib.loads(path.read_text()))
        known = TRAIN_SECTIONS if path.stem.startswith("demo-train") else recipe_sections()
        assert tables <= set(known), f"{path.name} has tables no command reads: {tables - set(known)}"
        configs = build({name: known[name] for name in tables}, path)
        assert set(configs) == tables, path


def test_every_field_has_help():
    import dataclasses

    for cls in (RuntimeConfig, ImagicConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"


def test_pyproject_lists_every_package():
    """The wheel's package list is written by hand; a new subpackage missing from it would only break installs, and
    the wheel test below is slow, so this quick check runs in every suite."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(path.parent.relative_to(root).parts)
        for path in (root / "peftedit").rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert found <= listed, found - listed


@pytest.mark.slow
def test_a_wheel_carries_the_recipes_and_the_demo_model(tmp_path):
    """Recipes by name must work from an installed wheel, not only from a checkout (the wheel maps recipes/ to
    peftedit/recipes). Builds without isolation, so no package is fetched."""
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path, root],
        check=True,
    )
    (wheel,) = tmp_path.glob("peftedit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"peftedit/recipes/{p.name}" for p in RECIPES_DIR.glob("*.toml")}
    assert shipped and shipped <= names
    assert "peftedit/demo/model/unet/diffusion_pytorch_model.safetensors" in names
    modules = {str(p.relative_to(root)) for p in (root / "peftedit").rglob("*.py")}
    assert modules <= names, modules - names  # pyproject lists the packages by hand: a new one must be added there
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target, wheel], check=True)
    probe = "from peftedit.config import resolve_recipe; print(resolve_recipe('sd15-8gb'))"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(target)}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == target / "peftedit" / "recipes" / "sd15-8gb.toml"


def _float_fields():
    for table, cls in recipe_sections().items():
        for f in dataclasses.fields(cls):
            if field_kinds(cls)[f.name] is float:
                yield table, f.name


FLOAT_FIELDS = list(_float_fields())


def test_the_float_fields_are_found():
    assert {("imagic", "eta"), ("imagic", "guidance"), ("nulltext", "guidance"), ("nulltext", "pivot_noise")} <= set(
        FLOAT_FIELDS
    )


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("table, key", FLOAT_FIELDS)
def test_every_float_option_refuses_nan_and_infinities(table, key, value):
    """NaN passed every range check (all comparisons are false) and produced garbage edits with exit 0."""
    with pytest.raises(PeftEditError, match=rf"^{table}\.{key} = -?(nan|inf) must be a finite number$"):
        build(recipe_sections(), None, [f"{table}.{key}={value}"])
    with pytest.raises(PeftEditError, match=rf"^{table}\.{key} = "):
        recipe_sections()[table](**{key: float(value)})


def test_list_elements_are_checked_in_the_python_api_too():
    with pytest.raises(PeftEditError, match=r"imagic.preview_etas\[1\] = 'a' must be a number"):
        ImagicConfig(preview_etas=[0.5, "a"])
    with pytest.raises(PeftEditError, match=r"imagic.preview_etas\[0\] = nan must be a finite number"):
        ImagicConfig(preview_etas=[float("nan")])
    config = ImagicConfig(preview_etas=[1, 0.5], lora_alpha=16)
    assert config.preview_etas == [1.0, 0.5] and isinstance(config.preview_etas[0], float)
    assert isinstance(config.lora_alpha, float)


def test_bare_list_fields_take_their_element_type_from_the_default():
    from peftedit.demo.train import SECTIONS as TRAIN_SECTIONS

    assert build(TRAIN_SECTIONS, None, ["model.vae_channels=[8, 16]"])["model"].vae_channels == [8, 16]
    with pytest.raises(PeftEditError, match=r"model.vae_channels\[1\] = 1.5 must be an integer"):
        build(TRAIN_SECTIONS, None, ["model.vae_channels=[8, 1.5]"])


@pytest.mark.parametrize("key", ["runtime.seed", "imagic.preview_seed", "nulltext.seed"])
def test_seeds_must_fit_the_generator(key):
    """torch's manual_seed overflowed on a huge --seed ("Overflow when unpacking long long"), after loading."""
    table, name = key.split(".")
    assert getattr(build(recipe_sections(), None, [f"{key}={2**63 - 1}"])[table], name) == 2**63 - 1
    for bad in (2**63, 99999999999999999999999, -1):
        with pytest.raises(PeftEditError, match=rf"^{key} = {bad} is out of range"):
            build(recipe_sections(), None, [f"{key}={bad}"])
    with pytest.raises(PeftEditError, match="out of range"):
        recipe_sections()[table](**{name: 2**64})


def test_a_recipe_for_the_other_method_says_so():
    with pytest.raises(PeftEditError, match=r"sd15-8gb.toml is for Imagic \(peftedit imagic\), with a \[imagic\]"):
        build({"runtime": SECTIONS["runtime"], "nulltext": NullTextConfig}, "sd15-8gb")
    with pytest.raises(PeftEditError, match=r"is for inversions \(peftedit invert\), with a \[nulltext\] table; this"):
        build({"runtime": SECTIONS["runtime"], "imagic": SECTIONS["imagic"]}, "nulltext-sd15-8gb")


def test_a_list_default_is_a_fresh_copy_for_every_config():
    """Configs that do not check their fields (the demo model's sizes) would otherwise share one list."""

    @dataclasses.dataclass
    class Sizes:
        widths: list = option([16, 32], "widths")
        names: dict = option({"a": 1}, "names")

    first = Sizes()
    first.widths.append(64)
    first.names["b"] = 2
    assert Sizes().widths == [16, 32] and Sizes().names == {"a": 1}


def test_only_null_text_has_a_learning_rate_to_run_out_and_the_error_says_what_to_give():
    """--steps 101 blamed lr_decay without saying what to change, and ddim (nothing optimized) was refused at 200 steps
    for a learning rate it does not have."""
    for method in ("ddim", "negative-prompt", "direct"):
        assert NullTextConfig(method=method, steps=200).steps == 200
    assert NullTextConfig(steps=100).steps == 100  # lr reaches 1e-2 * (1 - 99/100) > 0 at the last step
    with pytest.raises(PeftEditError) as caught:
        NullTextConfig(steps=101)
    assert str(caught.value) == (
        "nulltext.lr_decay = 0.01 makes the learning rate reach 0 within nulltext.steps = 101; give at most 100 steps "
        "or an lr_decay below 0.01"
    )
    with pytest.raises(PeftEditError, match="give at most 34 steps or an lr_decay below 0.0294"):
        NullTextConfig(steps=35, lr_decay=0.03)
    assert NullTextConfig(steps=34, lr_decay=0.03).steps == 34


def test_a_list_with_unquoted_strings_is_said_to_need_quotes():
    """--set imagic.lora_targets=[attention] (not TOML: bare words) said only "must be a list" of what was one."""
    with pytest.raises(PeftEditError) as caught:
        build({"imagic": ImagicConfig}, None, ["imagic.lora_targets=[attention, conv]"])
    assert str(caught.value) == (
        "imagic.lora_targets = '[attention, conv]' must be a list, written in TOML: strings in quotes, "
        'e.g. ["attention", "conv"]'
    )
    with pytest.raises(PeftEditError, match=r"^imagic.lora_targets = 'attention' must be a list$"):
        build({"imagic": ImagicConfig}, None, ["imagic.lora_targets=attention"])
