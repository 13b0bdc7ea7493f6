"""The export pipeline: options -> checkpoint -> family spec + weights -> decoder graph -> output folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import builder
from builder.checkpoint import Checkpoint
from builder.decoder import build_decoder
from builder.layers.attention import fit_chunked_attention
from builder.layers.mla import fit_latent_attention
from builder.genai_config import GENAI_TYPES, genai_config
from builder.output import (atomic_folder, check_destination, check_free_space, copy_tokenizer, save_model,
                            write_json)
from builder.progress import Progress
from builder.report import written_formats
from builder.runtime_requirements import ir_nodes, requirements
from builder.settings import ExportSettings
from builder.spec import ModelSpec
from builder.state import genai_names
from builder.weights import WeightMap
from builders import checkpoint_family, text_config
from builders.common import ignore_declared, reject_unconsumed, reject_unread, resolve_tied_head, skip_notes


# Written last inside the atomic folder: records how the model was made (read by `ortbuild verify` for the
# precision-dependent tolerance and the default reference, and by `ortbuild batch` to tell a finished export of the
# same recipe from a stale one).
MANIFEST = "ortbuild.json"


def manifest(model: str, input_dir: str | None, spec: ModelSpec, settings: ExportSettings, graph=None) -> dict:
    """How the model was made, and (given its graph) the oldest runtimes that can run it."""
    source = input_dir or model
    if Path(source).is_dir():
        source = str(Path(source).resolve())  # so `verify` finds the reference from any working directory
    made = {"producer": "ortbuild", "version": builder.__version__, "source": source,
            "architecture": spec.architecture, "precision": settings.precision, "ep": settings.ep,
            "io_dtype": settings.io_dtype, "extra_options": dict(settings.extra),
            "cuda_graph": bool(settings.graph_capture and settings.graph_capture.enabled),
            "lm_head_prepacked": settings.lm_head_prepacked,
            "last_token_logits": settings.last_token_logits, "left_padding": settings.left_padding}
    if graph is not None:
        made["requires"] = requirements(ir_nodes(graph), settings.ep, GENAI_TYPES.get(spec.model_type, "decoder"),
                                        genai_names(spec.state)[0])
    return made


@dataclass
class Prepared:
    """Everything decided before a weight is read (what `inspect` prints)."""

    checkpoint: Checkpoint
    spec: ModelSpec
    settings: ExportSettings
    weights: WeightMap
    config: dict  # the text config as read (genai_config takes token ids from it)
    notes: tuple[str, ...] = ()  # plan notes, tensors left out on purpose, tie decisions: shown before any write


def prepare(model: str, precision: str, ep: str, extra_options=None, *, input_dir: str | None = None,
            cache_dir: str | None = None) -> Prepared:
    settings = ExportSettings.resolve(precision, ep, extra_options)
    checkpoint = Checkpoint.resolve(model, input_dir, cache_dir)
    family, family_notes = checkpoint_family(checkpoint)
    config = text_config(family, checkpoint.config, checkpoint.architecture)
    spec = family.make_spec(config)
    ignore_declared(checkpoint, family.ignored)
    weights = family.map_weights(spec, checkpoint)
    spec, tie_notes = resolve_tied_head(spec, checkpoint, weights)
    spec, ep_notes = fit_chunked_attention(spec, settings.ep)
    spec, latent_notes = fit_latent_attention(spec, settings)
    settings = settings.with_plan(spec)
    capture_note = settings.graph_capture.note(settings.ep)
    notes = (*family_notes, *settings.plan.notes, *tie_notes, *ep_notes, *latent_notes, *skip_notes(checkpoint),
             *([capture_note] if capture_note else []))
    return Prepared(checkpoint, spec, settings, weights, config.data, notes)


def export(model: str, output: str | Path, precision: str = "fp32", ep: str = "cpu", extra_options=None, *,
           input_dir: str | None = None, cache_dir: str | None = None, overwrite: bool = False,
           progress: Progress | None = None) -> Path:
    progress = progress or Progress(quiet=True)
    output = Path(output)
    settings = ExportSettings.resolve(precision, ep, extra_options)  # usage errors before any work
    check_destination(output, overwrite)
    progress.stage(f"reading checkpoint {input_dir or model}")
    given = {key: settings.extra[key] for key in settings.given}  # defaults stay defaults (no "changes nothing" notes)
    prepared = prepare(model, precision, ep, given, input_dir=input_dir, cache_dir=cache_dir)
    spec, settings = prepared.spec, prepared.settings
    for note in prepared.notes:
        progress.note(note)
    progress.stage(f"{spec.architecture}: {spec.num_layers} layers, hidden {spec.hidden_size}, vocab "
                   f"{spec.vocab_size}; -p {precision} -e {ep}")
    model_ir = build_decoder(spec, settings, prepared.weights)
    reject_unread(prepared.weights)
    reject_unconsumed(prepared.checkpoint, spec.architecture)
    filename = settings.extra["filename"]
    check_free_space(model_ir, output)
    with atomic_folder(output, overwrite) as folder:
        save_model(model_ir, folder, filename, progress)
        generation = prepared.checkpoint.read_json("generation_config.json")
        write_json(folder / "genai_config.json", genai_config(spec, settings, prepared.config, generation, filename))
        copy_tokenizer(prepared.checkpoint.folder, folder)
        write_json(folder / MANIFEST, manifest(model, input_dir, spec, settings, model_ir.graph))
    size = sum(p.stat().st_size for p in output.iterdir() if p.is_file())
    progress.finish(output, size, written_formats(model_ir.graph, {"int4": 4, "int8": 8}.get(precision)))
    return output
