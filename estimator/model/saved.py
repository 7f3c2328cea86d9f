"""A saved estimator's folder (docs/model-format.md): `prefill.txt` and `decode.txt` (LightGBM text models),
`tables.npz` (the compiled tables) and `meta.json` (`ModelMeta`, with the sha256 of every file), and an iteration
model beside them where one was trained. Written file by file (tmp + rename, digest recorded) so a kill mid-save
never leaves a model that loads half; read back with every digest checked, and no pickle anywhere."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from estimator.data.runs import PHASES
from estimator.errors import EstimatorError, one_line_validation_error
from estimator.model.booster import PhaseModel, read_booster
from estimator.model.embedding import Projection
from estimator.model.features import PCA_DIM, FeatureSpec, Phase
from estimator.model.iteration import ITERATION_FILE, IterationEstimator
from estimator.model.meta import ModelMeta, TablesMeta, check_meta, checked_file, closed_form_from_meta, sha256_of
from estimator.model.tables import TABLES_FILE, TABLES_VERSION, CompiledTables


@dataclass
class Saved:
    """What a model folder holds, read and checked."""

    meta: ModelMeta
    models: dict[Phase, PhaseModel]
    projection: Projection | None
    tables: CompiledTables | None
    iteration: IterationEstimator | None


def save_estimator(
    meta: ModelMeta, models: Mapping[Phase, PhaseModel], tables: CompiledTables | None, path: Path | str
) -> Path:
    """Write `prefill.txt`, `decode.txt`, `tables.npz` and `meta.json` into the folder `path` (created); the
    files' digests are recorded in `meta`."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    for phase, model in models.items():
        # tmp + rename, and the digest in meta.json: a kill mid-save never leaves a model that loads half
        target = folder / meta.phases[phase].model_file
        tmp_model = target.with_name(target.name + ".tmp")
        model.booster.save_model(str(tmp_model))
        meta.phases[phase].sha256 = sha256_of(tmp_model)
        os.replace(tmp_model, target)
    if tables is not None:
        target = folder / TABLES_FILE
        tmp_tables = target.with_name(target.name + ".tmp")
        tables.save(tmp_tables)
        meta.tables = TablesMeta(
            file=TABLES_FILE,
            version=TABLES_VERSION,
            sha256=sha256_of(tmp_tables),
            configs=len(tables.keys),
            bytes=tables.nbytes(),
        )
        os.replace(tmp_tables, target)
    tmp = folder / "meta.json.tmp"
    tmp.write_text(json.dumps(meta.model_dump(mode="json"), indent=1) + "\n")
    os.replace(tmp, folder / "meta.json")
    return folder


def load_saved(path: Path | str) -> Saved:
    """Read a saved estimator's folder; any inconsistency is an EstimatorError with one line."""
    folder = Path(path)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise EstimatorError(f"{folder}: not a model folder (no meta.json)")
    try:
        raw = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EstimatorError(f"{meta_path}: unreadable ({exc})") from exc
    try:
        meta = ModelMeta.model_validate(raw)
    except ValidationError as exc:
        raise EstimatorError(f"{meta_path}: invalid metadata: {one_line_validation_error(exc)}") from exc
    check_meta(meta, meta_path)
    projection = Projection.from_dict(meta.embedding.pca.model_dump()) if meta.embedding else None
    dim = projection.dim if projection else PCA_DIM
    models: dict[Phase, PhaseModel] = {}
    for phase in PHASES:
        pm = meta.phases[phase]
        spec = FeatureSpec(phase, meta.variant, tuple(meta.axes), meta.categories, dim)
        if spec.names() != pm.features:
            raise EstimatorError(
                f"{meta_path}: {phase} feature list {pm.features} does not match variant {meta.variant!r} "
                f"with axes {meta.axes}"
            )
        model_path = checked_file(folder, pm.model_file, pm.sha256, "model file")
        cf = closed_form_from_meta(meta, phase) if meta.variant == "residual" else None
        # a model saved without digests is parsed now, so a swapped or damaged file fails here, not mid-use
        booster = read_booster(model_path, pm.features) if pm.sha256 is None else None
        models[phase] = PhaseModel(spec, booster, cf, model_path)
    tables = None
    if meta.tables is not None:
        tables_path = checked_file(folder, meta.tables.file, meta.tables.sha256, "tables file")
        tables = CompiledTables.load(tables_path, residual=meta.variant == "residual")
        if tables.axes != list(meta.axes) or len(tables.keys) != meta.tables.configs:
            raise EstimatorError(f"{tables_path}: tables do not match meta.json (axes or configs)")
    iteration = IterationEstimator.load(folder) if (folder / ITERATION_FILE).is_file() else None
    return Saved(meta, models, projection, tables, iteration)
