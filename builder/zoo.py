"""Zoo files: models x recipes, read from YAML or JSON and validated whole before any export starts.

A batch of exports can run for hours, so a typo in the last recipe must fail in the first second, with an error
naming the entry: unknown keys get a "did you mean", precisions/EPs/extra options go through the same parser and
cross-option rules as the command line (builder.options, ExportSettings.resolve), output names are checked unique.

    out_root: zoo-out                          # default for --out-root (relative to the zoo file)
    name_template: "{model_name}-{precision}-{ep}"
    verify: false                              # default for --verify
    recipes:
      int4-cpu: {precision: int4, ep: cpu, extra_options: {int4_algo_config: k_quant}}
    models:
      - model: Qwen/Qwen3-30B-A3B              # Hub id, or a folder (beside the zoo file, else the working dir)
        recipes: [int4-cpu]                    # default: every recipe
"""

from __future__ import annotations

import difflib
import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder import options as opts
from builder.errors import OrtBuildError, UsageError

TOP_KEYS = {"out_root", "name_template", "verify", "recipes", "models"}
RECIPE_KEYS = {"precision", "ep", "extra_options", "name_template", "verify", "tolerance", "min_top1", "verify_steps"}
MODEL_KEYS = {"model", "name", "input", "recipes", "extra_options", "verify", "reference", "reference_dtype",
              "tolerance", "min_top1"}
REFERENCE_DTYPES = ("float32", "bfloat16", "float16")
TEMPLATE_FIELDS = {"model_name", "recipe", "precision", "ep"}
DEFAULT_TEMPLATE = "{model_name}-{precision}-{ep}"


@dataclass(frozen=True)
class Job:
    """One export: a model under one recipe, fully resolved."""

    model_name: str
    recipe: str
    model: str  # Hub id or folder, as `-m`
    input_dir: str | None  # `-i` (a local folder holding the checkpoint), when given
    precision: str
    ep: str
    extra_args: tuple[str, ...]  # `key=value` for --extra_options, as the user wrote them (validated)
    resolved_extra: dict  # every extra option after defaults: what the export's ortbuild.json will record
    name: str  # output folder name (under the out root)
    verify: bool
    reference: str  # checkpoint to verify against
    reference_dtype: str  # dtype of the transformers reference (bfloat16 for models too big for fp32 in RAM)
    tolerance: float | None
    min_top1: float | None
    verify_steps: int | None

    @property
    def label(self) -> str:
        return f"{self.model_name} x {self.recipe}"


@dataclass(frozen=True)
class Zoo:
    path: Path
    out_root: Path | None
    jobs: tuple[Job, ...]


def _where(path: Path, entry: str) -> str:
    return f"{path.name}: {entry}"


def _check_keys(data: Any, allowed: set[str], where: str, required: tuple[str, ...] = ()) -> dict:
    if not isinstance(data, dict):
        raise UsageError(f"{where}: expected a mapping of keys ({', '.join(sorted(allowed))}), got "
                         f"{type(data).__name__}.")
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else f" Allowed keys: {', '.join(sorted(allowed))}."
            raise UsageError(f"{where}: unknown key '{key}'.{hint}")
    for key in required:
        if key not in data:
            raise UsageError(f"{where}: missing required key '{key}'.")
    return data


def _extra_items(value: Any, where: str) -> list[str]:
    """extra_options as a mapping ({k: v}) or a list of "k=v" strings -> ["k=v", ...] (YAML booleans -> true/false)."""
    if value is None:
        return []
    if isinstance(value, dict):
        items = []
        for key, val in value.items():
            if val is None:
                raise UsageError(f"{where}: extra option '{key}' has no value.")
            text = str(val).lower() if isinstance(val, bool) else str(val)
            items.append(f"{key}={text}")
        return items
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise UsageError(f"{where}: extra_options must be a mapping (int4_block_size: 64) or a list of 'key=value' "
                     "strings.")


def _check_template(template: Any, where: str) -> str:
    if not isinstance(template, str) or not template.strip():
        raise UsageError(f"{where}: name_template must be a non-empty string such as '{DEFAULT_TEMPLATE}'.")
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise UsageError(f"{where}: name_template {template!r} is malformed ({exc}).") from None
    unknown = fields - TEMPLATE_FIELDS
    if unknown or "" in fields:
        raise UsageError(f"{where}: name_template {template!r} uses unknown field(s) "
                         f"{', '.join(sorted(repr(f) for f in unknown or {''}))}; "
                         f"available: {', '.join('{' + f + '}' for f in sorted(TEMPLATE_FIELDS))}.")
    return template


def _number(value: Any, key: str, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{where}: {key} must be a number, got {value!r}.")
    return float(value)


def _bool(value: Any, key: str, where: str) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise UsageError(f"{where}: {key} must be true or false, got {value!r}.")
    return value


def _model_source(value: Any, base: Path, where: str) -> str:
    """A folder as an absolute path, or a Hub id as written: normalised once, so the export's manifest (which records
    folders absolute) and the resume check compare equal.

    A relative folder is looked up beside the zoo file first, then in the working directory; a value that can only be
    a path (see looks_like_path) and is neither is an error now rather than a failed export later.
    """
    from builder.checkpoint import looks_like_path

    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{where}: 'model' must be a Hub id (owner/name) or a folder.")
    path = Path(value).expanduser()
    for candidate in (base / path, Path.cwd() / path):  # an absolute path ignores the base
        if candidate.is_dir():
            return str(candidate.resolve())
    if looks_like_path(value):
        raise UsageError(f"{where}: no such folder {value} (looked beside the zoo file, in {base}, and in the "
                         f"working directory {Path.cwd()}).")
    return value


def read_zoo_file(path: Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read zoo file {path}: {exc.strerror}.") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}: not valid JSON ({exc}).") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UsageError(f"{path}: not valid YAML ({exc}).") from None
    return _check_keys(data, TOP_KEYS, path.name, required=("recipes", "models"))


def load_zoo(path: str | Path, verify: bool | None = None) -> Zoo:
    """Parse and validate a zoo file into jobs (no model is read); raises UsageError naming the bad entry.

    `verify` is the command line's --verify/--no-verify: False turns verification off everywhere; True makes it the
    default, which a model or recipe with `verify: false` (say, one too big for a CPU reference) still opts out of;
    None leaves the default to the file's top-level `verify`.
    """
    from builder.settings import ExportSettings

    path = Path(path)
    data = read_zoo_file(path)
    base = path.resolve().parent
    top_template = _check_template(data.get("name_template", DEFAULT_TEMPLATE), _where(path, "name_template"))
    top_verify = _bool(data.get("verify"), "verify", path.name)
    verify_default = bool(top_verify) if verify is None else verify
    recipes = data["recipes"]
    if not isinstance(recipes, dict) or not recipes:
        raise UsageError(f"{path.name}: 'recipes' must be a non-empty mapping of recipe name -> recipe.")
    for rname, recipe in recipes.items():
        where = _where(path, f"recipes.{rname}")
        _check_keys(recipe, RECIPE_KEYS, where, required=("precision",))
        if "name_template" in recipe:
            _check_template(recipe["name_template"], where)
    models = data["models"]
    if not isinstance(models, list) or not models:
        raise UsageError(f"{path.name}: 'models' must be a non-empty list of model entries.")
    jobs: list[Job] = []
    by_name: dict[str, str] = {}
    for index, entry in enumerate(models):
        where_model = _where(path, f"models[{index}]")
        _check_keys(entry, MODEL_KEYS, where_model, required=("model",))
        where_model += f" ({entry['model']})"
        source = _model_source(entry["model"], base, where_model)
        input_dir = None
        if entry.get("input") is not None:
            input_dir = _model_source(str(entry["input"]), base, where_model)
        model_name = entry.get("name") or Path(str(entry["model"]).rstrip("/")).name
        wanted = entry.get("recipes", list(recipes))
        if not isinstance(wanted, list) or not wanted:
            raise UsageError(f"{where_model}: 'recipes' must be a non-empty list of recipe names.")
        for rname in wanted:
            if rname not in recipes:
                close = difflib.get_close_matches(str(rname), recipes, n=1, cutoff=0.6)
                hint = f" Did you mean '{close[0]}'?" if close else f" Defined: {', '.join(recipes)}."
                raise UsageError(f"{where_model}: unknown recipe '{rname}'.{hint}")
            recipe = recipes[rname]
            where = f"{where_model}, recipe {rname}"
            precision, ep = recipe["precision"], recipe.get("ep", "cpu")
            extra_args = (_extra_items(recipe.get("extra_options"), f"{path.name}: recipes.{rname}") +
                          _extra_items(entry.get("extra_options"), where_model))
            try:
                merged = dict(opts.split_pairs(extra_args))  # a model entry's value wins over its recipe's
            except UsageError as exc:
                raise UsageError(f"{where}: {exc}") from None
            extra_args = [f"{k}={v}" for k, v in merged.items()]
            try:
                settings = ExportSettings.resolve(str(precision), str(ep), extra_args)
            except OrtBuildError as exc:
                raise UsageError(f"{where}: {exc}") from None
            fields = {"model_name": model_name, "recipe": rname, "precision": precision, "ep": ep}
            name = recipe.get("name_template", top_template).format(**fields)
            if not name or "/" in name or name.startswith("."):
                raise UsageError(f"{where}: output name {name!r} must be a plain folder name (no '/', not hidden).")
            if name in by_name:
                raise UsageError(f"{where}: output name '{name}' is also produced by {by_name[name]}. Give the "
                                 "models distinct 'name's or use {recipe} in name_template.")
            by_name[name] = where
            entry_verify = _bool(entry.get("verify"), "verify", where_model)
            if entry_verify is None:
                entry_verify = _bool(recipe.get("verify"), "verify", where)
            steps = recipe.get("verify_steps")
            if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
                raise UsageError(f"{where}: verify_steps must be a non-negative integer, got {steps!r}.")
            tolerance = _number(entry.get("tolerance", recipe.get("tolerance")), "tolerance", where)
            min_top1 = _number(entry.get("min_top1", recipe.get("min_top1")), "min_top1", where)
            reference = entry.get("reference")
            reference = _model_source(reference, base, where_model) if reference else (input_dir or source)
            reference_dtype = entry.get("reference_dtype", "float32")
            if reference_dtype not in REFERENCE_DTYPES:
                raise UsageError(f"{where_model}: reference_dtype {reference_dtype!r} is not one of "
                                 f"{', '.join(REFERENCE_DTYPES)}.")
            jobs.append(Job(model_name=model_name, recipe=rname, model=source, input_dir=input_dir,
                            precision=str(precision), ep=str(ep), extra_args=tuple(extra_args),
                            resolved_extra=dict(settings.extra), name=name,
                            verify=verify is not False and (verify_default if entry_verify is None else entry_verify),
                            reference=reference,
                            reference_dtype=reference_dtype,
                            tolerance=tolerance, min_top1=min_top1, verify_steps=steps))
    out_root = data.get("out_root")
    if out_root is not None and not isinstance(out_root, str):
        raise UsageError(f"{path.name}: out_root must be a folder path, got {out_root!r}.")
    return Zoo(path=path, out_root=(base / out_root).resolve() if out_root else None, jobs=tuple(jobs))
