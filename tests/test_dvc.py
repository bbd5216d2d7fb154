"""The DVC pipeline as a user drives it: `dvc repro` re-runs exactly the stages whose inputs changed.

Tests 1-3 share one throwaway project and walk one history in order (each step runs once, on first use, after the
steps before it): first repro -> repro again -> edit one caption -> repro -> change train.learning_rate -> repro.
Which stages ran is read from `dvc repro`'s own log lines (dvc 3.x: "Running stage 'X':" when it executes a stage,
"Stage 'X' didn't change, skipping" when it does not), cross-checked against dvc.lock and the files on disk.

The last test checks that dvc.yaml declares exactly the paths `flux2lora.layout.Layout` says the stages write.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from flux2lora.cache.store import TensorStore
from flux2lora.layout import Layout, layout_for
from flux2lora.params_table import PIPELINE_STAGES
from flux2lora.stages import STAGES
from helpers import REPO, run, set_params

pytestmark = pytest.mark.slow

ALL_STAGES = list(STAGES)  # pipeline order: params, prepare, encode-text, encode-latents, train, validate, publish
EDITED_CAPTION = "data/demo/shape_003.txt"
EDITED_IMAGE_ID = "shape_003.png"
NEW_CAPTION = "sks style, a striped hexagon on a grey background\n"

# dvc 3.x log lines (dvc/stage/run.py, dvc/stage/__init__.py, dvc/stage/cache.py)
RAN = re.compile(r"^Running stage '(?P<stage>[^']+)':$", re.M)
SKIPPED = re.compile(r"^Stage '(?P<stage>[^']+)' didn't change, skipping$", re.M)
FROM_RUN_CACHE = re.compile(r"^Stage '(?P<stage>[^']+)' is cached - skipping run, checking out outputs$", re.M)


# --------------------------------------------------------------------------------------------------------------
# One project, one history


@dataclass
class Repro:
    """One `dvc repro`: its output, which stages it ran / skipped, and dvc.lock around it."""

    stdout: str
    stderr: str
    ran: list[str]
    skipped: list[str]
    from_run_cache: list[str]
    lock_before: dict
    lock_after: dict
    before: dict = field(default_factory=dict)  # snapshots of files on disk, per step
    after: dict = field(default_factory=dict)

    def describe(self) -> str:
        return (f"ran {self.ran}, skipped {self.skipped}, restored from run cache {self.from_run_cache}\n"
                f"--- dvc repro stdout (tail) ---\n{self.stdout[-3000:]}")

    def stage_output(self, stage: str) -> str:
        """What `flux2lora stage <stage>` printed during this repro (from its header to the next stage's)."""
        headers = sorted((m for rx in (RAN, SKIPPED, FROM_RUN_CACHE) for m in rx.finditer(self.stdout)),
                         key=lambda m: m.start())
        for i, m in enumerate(headers):
            if m.re is RAN and m.group("stage") == stage:
                end = headers[i + 1].start() if i + 1 < len(headers) else len(self.stdout)
                return self.stdout[m.end():end]
        raise AssertionError(f"stage {stage!r} did not run in this repro; {self.describe()}")

    def stage_summary(self, stage: str) -> dict:
        """The JSON summary `flux2lora stage <stage>` prints last (after its log lines)."""
        text = self.stage_output(stage)
        start = text.find("\n{\n")
        assert start >= 0, f"no JSON summary in the output of stage {stage!r}:\n{text}"
        summary, _ = json.JSONDecoder().raw_decode(text, start + 1)
        return summary


def lock_stages(root: Path) -> dict:
    lock = root / "dvc.lock"
    return (yaml.safe_load(lock.read_text()) or {}).get("stages", {}) if lock.exists() else {}


def dvc_repro(root: Path) -> Repro:
    lock_before = lock_stages(root)
    proc = run(["dvc", "repro"], root)
    return repro_of(proc.stdout, proc.stderr, lock_before, lock_stages(root))


def repro_of(stdout: str, stderr: str, lock_before: dict, lock_after: dict) -> Repro:
    """What one `dvc repro` did, from its output and dvc.lock before and after it."""
    stages = lambda rx: [m.group("stage") for m in rx.finditer(stdout)]  # noqa: E731
    result = Repro(stdout, stderr, stages(RAN), stages(SKIPPED), stages(FROM_RUN_CACHE), lock_before, lock_after)
    reported = sorted(result.ran + result.skipped + result.from_run_cache)
    assert reported == sorted(ALL_STAGES), (
        f"could not tell what dvc repro did with every stage (each of {ALL_STAGES} should be reported exactly "
        f"once as run or skipped); has dvc's wording changed? {result.describe()}")
    return result


def snapshot(root: Path) -> dict:
    """The on-disk facts the tests compare before and after a repro."""
    layout = layout_for(root, yaml.safe_load((root / "params.yaml").read_text())["output_dir"])
    def entries(folder: Path) -> dict:
        """Cache key -> mtime of the shard holding it: a rewritten entry shows as a changed mtime."""
        store = TensorStore(folder)
        return {key: store.shard_of(key).stat().st_mtime_ns for key in sorted(store.keys())}

    return {
        "images_manifest": layout.images_manifest.read_bytes(),
        "text_index": json.loads((layout.text_embeds_dir / "index.json").read_text()),
        "text_entries": entries(layout.text_embeds_dir),
        "latents_index_mtime": (layout.latents_dir / "index.json").stat().st_mtime_ns,
        "latent_entries": entries(layout.latents_dir),
    }


class History:
    """The shared project's history. Each step runs at most once, after the steps it follows; a step that
    failed fails every later test that needs it with the original error instead of running again."""

    def __init__(self, root: Path, first_repro: Callable[[], Repro]):
        self.root = root
        self._first_repro = first_repro
        self._done: dict[str, Any] = {}

    def _step(self, name: str, fn: Callable[[], Any]) -> Any:
        if name not in self._done:
            try:
                self._done[name] = fn()
            except BaseException as e:  # noqa: BLE001 - remembered and re-raised below
                self._done[name] = e
                raise
        result = self._done[name]
        if isinstance(result, BaseException):
            pytest.fail(f"an earlier step of the shared DVC history failed ({name}): {result!r}")
        return result

    def first_repro(self) -> Repro:
        return self._step("first repro", self._first_repro)

    def second_repro(self) -> Repro:
        self.first_repro()
        return self._step("second repro", lambda: dvc_repro(self.root))

    def repro_after_caption_edit(self) -> Repro:
        self.second_repro()

        def step() -> Repro:
            before = snapshot(self.root)
            caption = self.root / EDITED_CAPTION
            assert caption.read_text() != NEW_CAPTION
            caption.write_text(NEW_CAPTION)
            result = dvc_repro(self.root)
            result.before, result.after = before, snapshot(self.root)
            return result

        return self._step("repro after a caption edit", step)

    def repro_after_learning_rate_change(self) -> tuple[Repro, float]:
        self.repro_after_caption_edit()

        def step() -> tuple[Repro, float]:
            before = snapshot(self.root)
            old = yaml.safe_load((self.root / "params.yaml").read_text())["train"]["learning_rate"]
            new = float(old) * 2
            set_params(self.root, **{"train.learning_rate": new})
            result = dvc_repro(self.root)
            result.before, result.after = before, snapshot(self.root)
            return result, new

        return self._step("repro after a learning-rate change", step)


@pytest.fixture(scope="module")
def history(repro_project, reproduced_demo) -> History:
    """The history starts from conftest's demo project, fresh from `make_project`, through its first `dvc repro`
    (run once per session and shared with other files; this module walks its own copy): that repro's output and
    dvc.lock are the first step's."""
    def first_repro() -> Repro:
        out = reproduced_demo.parent
        return repro_of((out / "repro.stdout").read_text(), (out / "repro.stderr").read_text(), {},
                        lock_stages(repro_project))

    return History(repro_project, first_repro)


def stages_except(*names: str) -> list[str]:
    return [s for s in ALL_STAGES if s not in names]


# --------------------------------------------------------------------------------------------------------------
# 1. nothing changed -> nothing runs


def test_first_repro_runs_every_stage_in_pipeline_order(history):
    first = history.first_repro()
    assert first.ran == ALL_STAGES, f"a fresh project should run every stage in order; {first.describe()}"


def test_second_repro_does_nothing(history):
    second = history.second_repro()
    assert second.ran == [] and second.from_run_cache == [], (
        f"nothing changed since the first repro, yet dvc repro ran stages; {second.describe()}")
    assert second.skipped == ALL_STAGES
    assert second.lock_after == second.lock_before, "a repro that ran nothing must leave dvc.lock as it was"

    status = json.loads(run(["dvc", "status", "--json"], history.root).stdout or "{}")
    assert status == {}, f"dvc status should report the pipeline up to date, got: {status}"


# --------------------------------------------------------------------------------------------------------------
# 2. a caption edit re-runs the text side, not the image side


def test_caption_edit_reruns_every_stage_except_encode_latents(history):
    repro = history.repro_after_caption_edit()
    expected = stages_except("params", "encode-latents")
    assert repro.ran == expected, (
        f"editing {EDITED_CAPTION} should re-run exactly {expected}; {repro.describe()}")
    assert repro.skipped == ["params", "encode-latents"], f"params.yaml and the images did not change; {repro.describe()}"


def test_caption_edit_leaves_image_manifest_and_latents_untouched(history):
    repro = history.repro_after_caption_edit()
    assert repro.after["images_manifest"] == repro.before["images_manifest"], (
        "prepare must rewrite images.jsonl byte-identically when only a caption changed; otherwise "
        "encode-latents (which depends on it) would re-run")
    assert repro.lock_after["encode-latents"] == repro.lock_before["encode-latents"], (
        "dvc.lock's encode-latents entry changed although the stage did not run")
    assert repro.after["latents_index_mtime"] == repro.before["latents_index_mtime"], (
        "latents/index.json was rewritten: something re-ran encode-latents")
    assert repro.after["latent_entries"] == repro.before["latent_entries"], "latent cache entries were touched"


def test_caption_edit_encodes_only_the_changed_caption(history):
    repro = history.repro_after_caption_edit()
    summary = repro.stage_summary("encode-text")
    assert summary["encoded"] == 1, (
        f"only the edited caption is new, so encode-text should encode 1 prompt and reuse the rest: {summary}")
    assert summary["reused"] == summary["unique_prompts"] - 1, summary

    old_key = repro.before["text_index"]["captions"][EDITED_IMAGE_ID]
    new_key = repro.after["text_index"]["captions"][EDITED_IMAGE_ID]
    assert new_key != old_key, "the edited caption must get a new content key"
    before, after = repro.before["text_entries"], repro.after["text_entries"]
    assert set(after) - set(before) == {new_key}, "exactly one entry (the edited caption's) should be added"
    kept = set(before) & set(after)
    touched = sorted(k for k in kept if after[k] != before[k])
    assert not touched, f"reused text embeddings were rewritten (content-addressed store not reused): {touched}"
    others_before = {k: v for k, v in repro.before["text_index"]["captions"].items() if k != EDITED_IMAGE_ID}
    others_after = {k: v for k, v in repro.after["text_index"]["captions"].items() if k != EDITED_IMAGE_ID}
    assert others_after == others_before, "captions that did not change must keep their embeddings"


# --------------------------------------------------------------------------------------------------------------
# 3. a training hyper-parameter re-runs training and what follows it


def test_learning_rate_change_reruns_only_train_validate_publish(history):
    repro, new_lr = history.repro_after_learning_rate_change()
    assert repro.ran == ["params", "train", "validate", "publish"], (
        f"changing train.learning_rate should re-run only train, validate and publish (after the params stage "
        f"rewrote their params files); {repro.describe()}")
    assert repro.skipped == ["prepare", "encode-text", "encode-latents"], repro.describe()
    for stage in ("prepare", "encode-text", "encode-latents"):
        assert repro.lock_after[stage] == repro.lock_before[stage], f"dvc.lock's {stage} entry changed"
    assert repro.after["text_entries"] == repro.before["text_entries"], "text embeddings were touched"
    assert repro.after["latent_entries"] == repro.before["latent_entries"], "latents were touched"
    recorded = json.loads((history.root / "outputs/params/train.json").read_text())["train.learning_rate"]
    assert recorded == pytest.approx(new_lr), f"train's params file should hold the new learning rate {new_lr}"


# --------------------------------------------------------------------------------------------------------------
# 4. dvc.yaml and layout.py describe the same files

# Layout paths each stage writes: every one must be an out (or metric) of exactly one stage in dvc.yaml.
DECLARED_LAYOUT_PATHS = {
    "images_manifest": "prepare", "captions_manifest": "prepare", "prepare_report": "prepare",
    "text_embeds_dir": "encode-text", "prompt_embeds_dir": "encode-text", "latents_dir": "encode-latents",
    "lora_dir": "train", "run_file": "train", "train_metrics": "train",
    "validation_dir": "validate", "publish_dir": "publish",
}
# Layout paths that are not outs themselves: a file inside an out, and the folder holding two train outs.
DERIVED_LAYOUT_PATHS = {"lora_file", "train_dir", "params_dir"}
# Bookkeeping DVC must not see (prepare's per-file records, cache verification stamps): neither out nor dep.
# Working state that must not look like a stage output: prepare's file records, train's checkpoints (a clone that
# pulled the outputs would otherwise retrain).
UNTRACKED_LAYOUT_PATHS = {"state_dir", "prepare_records", "checkpoints_dir"}
# dvc.yaml outs without a Layout property: publish writes `output_dir / "publish.json"` directly.
OUTS_WITHOUT_LAYOUT_PROPERTY = {"publish.json"}


def layout_paths(layout: Layout) -> dict[str, Path]:
    names = [n for n, v in vars(Layout).items() if isinstance(v, property)]
    return {n: getattr(layout, n) for n in names}


@pytest.fixture(params=["shipped", "elsewhere/runs"], ids=["output_dir-as-shipped", "output_dir-moved"])
def pipeline(request, tmp_path):
    """The repo's dvc.yaml and params.yaml in a bare DVC project, with output_dir as shipped or moved (so a path
    hard-coded in dvc.yaml instead of `${output_dir}/...` shows up)."""
    root = tmp_path / "project"
    root.mkdir()
    for name in ("dvc.yaml", "params.yaml", "user_prompt_library.json"):
        (root / name).write_bytes((REPO / name).read_bytes())
    if request.param != "shipped":
        set_params(root, output_dir=request.param)
    run(["dvc", "init", "--no-scm", "-q"], root)
    params = yaml.safe_load((root / "params.yaml").read_text())

    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        stages = {s.name: s for s in repo.index.stages}
        outs = {name: {Path(o.fs_path) for o in s.outs} for name, s in stages.items()}
        deps = {name: {Path(d.fs_path) for d in s.deps if not isinstance(d, ParamsDependency)}
                for name, s in stages.items()}
        cmds = {name: s.cmd for name, s in stages.items()}
    return root, params, list(stages), cmds, outs, deps


def test_dvc_yaml_has_the_stages_in_pipeline_order(pipeline):
    _, _, names, cmds, _, _ = pipeline
    assert names == ALL_STAGES, f"dvc.yaml stages {names} should be {ALL_STAGES} in that order"
    assert cmds == {name: f"flux2lora stage {name}" for name in ALL_STAGES}


def test_every_layout_path_is_an_out_of_the_stage_that_writes_it(pipeline):
    root, params, _, _, outs, _ = pipeline
    paths = layout_paths(layout_for(root, params["output_dir"]))
    known = set(DECLARED_LAYOUT_PATHS) | DERIVED_LAYOUT_PATHS | UNTRACKED_LAYOUT_PATHS
    assert set(paths) == known, (
        "Layout gained or lost a path: declare it in dvc.yaml and list it in DECLARED_LAYOUT_PATHS "
        f"(or DERIVED_LAYOUT_PATHS / UNTRACKED_LAYOUT_PATHS): {sorted(set(paths) ^ known)}")
    problems = []
    for name, stage in DECLARED_LAYOUT_PATHS.items():
        owners = [s for s, declared in outs.items() if paths[name].resolve() in {p.resolve() for p in declared}]
        if owners != [stage]:
            problems.append(f"Layout.{name} ({paths[name].relative_to(root)}) is an out of {owners or 'no stage'}, "
                            f"expected {stage!r}")
    assert not problems, "dvc.yaml and layout.py disagree:\n" + "\n".join(problems)
    lora = {p.resolve() for p in outs["train"]}
    assert paths["lora_dir"].resolve() in lora and paths["lora_file"].parent == paths["lora_dir"]
    declared = {p.resolve() for ps in outs.values() for p in ps}
    for name in UNTRACKED_LAYOUT_PATHS:
        path = paths[name].resolve()
        assert not any(path == p or p in path.parents for p in declared), (
            f"Layout.{name} ({path}) is bookkeeping and must stay outside every DVC out")


def test_every_dvc_out_is_a_layout_path_under_output_dir(pipeline):
    root, params, _, _, outs, _ = pipeline
    layout = layout_for(root, params["output_dir"])
    known = {p.resolve() for p in layout_paths(layout).values()}
    known |= {(layout.output_dir / n).resolve() for n in OUTS_WITHOUT_LAYOUT_PROPERTY}
    known |= {layout.stage_params(stage).resolve() for stage in PIPELINE_STAGES}  # the params stage's files
    stray = sorted(f"{stage}: {p}" for stage, paths in outs.items() for p in paths if p.resolve() not in known)
    assert not stray, f"dvc.yaml declares outs that layout.py does not know (hard-coded, not under output_dir?): {stray}"


def test_every_dep_is_an_earlier_stage_out_or_the_dataset_or_prompt_library(pipeline):
    root, params, _, _, outs, deps = pipeline
    inputs = {(root / "params.yaml").resolve(): "params.yaml (the params stage's only input)",
              (root / params["prepare"]["data_root"]).resolve(): "the datasets' root",
              (root / params["validate"]["user_prompt_library"]).resolve(): "the prompt library"}
    problems = []
    for i, stage in enumerate(ALL_STAGES):
        earlier = {p.resolve(): s for s in ALL_STAGES[:i] for p in outs[s]}
        for dep in sorted(deps[stage]):
            if dep.resolve() not in earlier and dep.resolve() not in inputs:
                later = [s for s in ALL_STAGES[i:] if dep.resolve() in {p.resolve() for p in outs[s]}]
                problems.append(f"{stage} depends on {dep.relative_to(root)} which is " +
                                (f"an out of {later} (not an earlier stage)" if later else "produced by no stage"))
    assert not problems, "\n".join(problems)
    assert {p.resolve() for p in deps["prepare"]} == {(root / params["prepare"]["data_root"]).resolve(),
                                                      layout_for(root, params["output_dir"]).stage_params(
                                                          "prepare").resolve()}, (
        "prepare should depend on the folder holding every dataset, prepare.data_root (and nothing else but params)")
    dataset = (root / params["prepare"]["instance_data_dir"]).resolve()
    assert (root / params["prepare"]["data_root"]).resolve() in dataset.parents, "the shipped dataset is in data_root"
