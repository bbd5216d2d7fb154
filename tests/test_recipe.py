"""The train stage reads like a recipe: named phases, and no function in train/ above radon's grade C."""

from __future__ import annotations

from pathlib import Path

from radon.complexity import cc_rank, cc_visit

from flux2lora.train.recipe import LoRATrainingRecipe

TRAIN = Path(__file__).parents[1] / "src" / "flux2lora" / "train"


def test_the_recipe_has_its_phases_by_name():
    for phase in ("setup", "resume", "train", "save"):
        assert callable(getattr(LoRATrainingRecipe, phase)), phase


def test_no_function_in_train_is_above_grade_c():
    too_complex = [f"{path.name}:{block.lineno} {block.name} ({block.complexity}, {cc_rank(block.complexity)})"
                   for path in sorted(TRAIN.glob("*.py")) for block in cc_visit(path.read_text())
                   if cc_rank(block.complexity) > "C"]
    assert not too_complex, f"functions in train/ above grade C: {too_complex}"
