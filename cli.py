"""`m2f`: the command line. Parses options into each job's config and calls `jobs/`; nothing else (pipeline/'s
`Storage` appears here only as a type)."""

from __future__ import annotations

import functools
import json
from typing import Annotated, Any, NoReturn

import typer

from m2f.jobs.common.config_file import merged_options, required
from m2f.jobs.common.configs import DEVICES, LIMITS, PRECISIONS, SegmentConfig, TrainConfig, number
from m2f.jobs.common.console import Console
from m2f.pipeline.storage import Storage

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Batch Mask2Former segmentation on Ray: object storage in, COCO-RLE Parquet out.",
)


def one_of(*values: str) -> dict[str, Any]:
    """typer settings for a string that must be one of `values`: shown in --help and checked by typer,
    and a wrong value is not echoed (it may be 100 000 characters long)."""

    def parse(value: str) -> str:
        if value not in values:
            raise typer.BadParameter(f"must be one of {', '.join(values)}")
        return value

    return {"parser": parse, "metavar": f"[{'|'.join(values)}]"}


def bounded(text: str, name: str) -> str:
    """An option's help with its bounds from configs.LIMITS (SegmentConfig.validate checks them)."""
    low, high = LIMITS[name]
    return f"{text} ({number(low)} to {number(high)})"


TASKS, DATA_FORMATS = ("semantic", "instance", "panoptic"), ("coco-panoptic", "coco-instances", "semantic")
S, T = SegmentConfig, TrainConfig  # each option's default is its config field's, written once there

ModelOpt = functools.partial(typer.Option, rich_help_panel="Model")  # groups: no --help table wraps at 80 columns
ComputeOpt = functools.partial(typer.Option, rich_help_panel="Compute")
RunOpt = functools.partial(typer.Option, rich_help_panel="Run")
LifecycleOpt = functools.partial(typer.Option, rich_help_panel="Commits, stops and stalls")
OutputOpt = functools.partial(typer.Option, rich_help_panel="Output")
DataOpt = functools.partial(typer.Option, rich_help_panel="Data")
StorageOpts = functools.partial(typer.Option, rich_help_panel="Storage")


EndpointOpt = Annotated[
    str | None, StorageOpts(help="S3-compatible endpoint URL (MinIO, Ceph, moto, ...).", envvar="M2F_ENDPOINT_URL")
]
StorageOpt = Annotated[
    str | None, StorageOpts(help="fsspec storage options as JSON, e.g. '{\"anon\": true}' (never logged).")
]
RayAddressOpt = Annotated[
    str | None, ComputeOpt(help="Join this Ray cluster (e.g. auto, ray://head:10001); default: start a local Ray.")
]


def refuse(message: str, *, json_mode: bool = False) -> NoReturn:
    """A bad argument: one line on stderr (with --json, the 'invalid' result as stdout's last line); exit 2."""
    console = Console(json_mode=json_mode)
    console.line(f"error: {message}", err=True)
    if json_mode:
        console.result(json.dumps({"status": "invalid", "exit_code": 2, "error": message}))
    raise typer.Exit(2)


def checked_uris(**named: str | None) -> None:
    """Refuse over-long URIs and URIs with credentials in them (`s3://user:pass@...`), one line, exit 2.
    Keys: the option's name as the user writes it, "_" for "-" (`gt`, `endpoint_url`), upper case for arguments."""
    from m2f.jobs.common.arguments import check_uris

    try:
        check_uris({(k if k.isupper() else f"--{k.replace('_', '-')}"): v for k, v in named.items()})
    except ValueError as e:
        refuse(str(e))


def storage_of(endpoint_url: str | None, storage_options: str | None) -> Storage:
    """The Storage for --endpoint-url and --storage-options; malformed options: one error line, exit 2."""
    from m2f.jobs.common.arguments import checked_storage

    try:
        return checked_storage(endpoint_url, storage_options)
    except ValueError as e:  # its message never echoes the JSON, which may hold a secret
        refuse(str(e))


def options_of(ctx: typer.Context, config_file: str | None, *names: str, json_mode: bool = False) -> dict[str, Any]:
    """The command's options (command line over --config file over defaults), `names` required; a bad
    --config file or a missing argument: one line, exit 2."""
    try:
        values = merged_options(ctx, config_file)
        required(values, *names)
    except typer.BadParameter as e:
        refuse(e.message, json_mode=json_mode)
    return values


ConfigOpt = Annotated[
    str | None,
    RunOpt(
        "--config",
        help="TOML file of options (keys as the option names, e.g. batch_size or batch-size); the command line wins.",
    ),
]


# `m2f segment`'s options, one type each (the command's signature then fits on a screen).
SegmentInput = Annotated[
    str | None,
    typer.Argument(
        metavar="INPUT",
        show_default=False,
        help="URI prefix, local folder, glob, or manifest (.txt/.csv/.parquet).",
    ),
]
SegmentOutput = Annotated[
    str | None,
    typer.Argument(
        metavar="OUTPUT", show_default=False, help="Output URI prefix: Parquet dataset, run reports, previews."
    ),
]
SegmentModel = Annotated[str, ModelOpt(help="Checkpoint: HF directory, detectron2 .pkl/.pth, or ours.")]
SegmentModelSha256 = Annotated[
    str | None, ModelOpt(help="Expected sha256 of a checkpoint fetched by name or URL (checked before it is cached).")
]
SegmentPreset = Annotated[str | None, ModelOpt(help="Dataset preset for a detectron2 checkpoint.")]
SegmentTask = Annotated[str | None, ModelOpt(help="Post-processing; default: the checkpoint's task.", **one_of(*TASKS))]
SegmentActors = Annotated[int, ComputeOpt(help=bounded("Model actors (one model copy each).", "actors"))]
SegmentBatchSize = Annotated[int, ComputeOpt(help=bounded("Images per forward pass.", "batch_size"))]
SegmentDevice = Annotated[str, ComputeOpt(help="Where the model runs.", **one_of(*DEVICES))]
SegmentGpusPerActor = Annotated[
    float, ComputeOpt(help=bounded("GPUs per actor (fractions share a GPU).", "gpus_per_actor"))
]
SegmentCpusPerActor = Annotated[
    float, ComputeOpt(help=bounded("CPUs per model actor (and torch threads).", "cpus_per_actor"))
]
SegmentPrecision = Annotated[str, ModelOpt(help="Autocast precision of the forward pass.", **one_of(*PRECISIONS))]
SegmentScoreThreshold = Annotated[
    float | None, ModelOpt(help="Drop segments scoring below this; default 0.5 for instance, else 0.")
]
SegmentMaxPixels = Annotated[int, RunOpt(help=bounded("Reject larger images (decompression bombs).", "max_pixels"))]
SegmentMaxFileBytes = Annotated[
    int, RunOpt(help=bounded("Reject larger files (an error row) without reading them.", "max_file_bytes"))
]
SegmentMaxErrorRate = Annotated[float, RunOpt(help=bounded("Exit non-zero above this error rate.", "max_error_rate"))]
SegmentOverwrite = Annotated[bool, RunOpt("--overwrite", help="Redo images that already have an ok row.")]
SegmentPreview = Annotated[
    int, RunOpt(help=bounded("Write this many overlay PNGs under OUTPUT/_previews/.", "preview"))
]
SegmentProgress = Annotated[
    bool | None,
    OutputOpt(
        "--progress/--no-progress",
        help="A live progress bar; default: on a terminal (elsewhere a progress line every 30 s).",
    ),
]
SegmentFlushSeconds = Annotated[
    float,
    LifecycleOpt(help=bounded("Commit a part file once its oldest row has waited this long.", "flush_seconds")),
]
SegmentGraceSeconds = Annotated[
    float,
    LifecycleOpt(help=bounded("On SIGTERM/SIGINT: time to commit finished rows before exiting.", "grace_seconds")),
]
SegmentStallTimeout = Annotated[
    float,
    LifecycleOpt(help=bounded("End the run (exit 3) when no image finishes for this many seconds.", "stall_timeout")),
]
SegmentAllowEmpty = Annotated[
    bool, RunOpt("--allow-empty", help="An INPUT that lists no image is not an error (exit 0).")
]
SegmentJsonReport = Annotated[
    bool, OutputOpt("--json", help="Print the run report as JSON, the last line of stdout; the rest to stderr.")
]


@app.command()
def segment(
    ctx: typer.Context,
    input: SegmentInput = None,
    output: SegmentOutput = None,
    config_file: ConfigOpt = None,
    model: SegmentModel = S.model,
    model_sha256: SegmentModelSha256 = None,
    preset: SegmentPreset = None,
    task: SegmentTask = None,
    endpoint_url: EndpointOpt = None,
    storage_options: StorageOpt = None,
    actors: SegmentActors = S.actors,
    batch_size: SegmentBatchSize = S.batch_size,
    device: SegmentDevice = S.device,
    gpus_per_actor: SegmentGpusPerActor = S.gpus_per_actor,
    cpus_per_actor: SegmentCpusPerActor = S.cpus_per_actor,
    precision: SegmentPrecision = S.precision,
    score_threshold: SegmentScoreThreshold = None,
    max_pixels: SegmentMaxPixels = S.max_pixels,
    max_file_bytes: SegmentMaxFileBytes = S.max_file_bytes,
    max_error_rate: SegmentMaxErrorRate = S.max_error_rate,
    overwrite: SegmentOverwrite = S.overwrite,
    preview: SegmentPreview = S.preview,
    progress: SegmentProgress = None,
    flush_seconds: SegmentFlushSeconds = S.flush_seconds,
    grace_seconds: SegmentGraceSeconds = S.grace_seconds,
    stall_timeout: SegmentStallTimeout = S.stall_timeout,
    allow_empty: SegmentAllowEmpty = S.allow_empty,
    json_report: SegmentJsonReport = False,
    ray_address: RayAddressOpt = None,
) -> None:
    """Segment every image under INPUT and write one Parquet row per image under OUTPUT.

    Rows are committed while the run goes (every 512 rows or --flush-seconds).

    Exit codes: 0 done; 1 error rate above --max-error-rate; 2 bad arguments;
    3 storage, cluster or model failure, or a stall; 130/143 cancelled by SIGINT/SIGTERM;
    75 another run holds OUTPUT (retry later). After any of them but 2 and 75, re-running resumes.
    """
    from m2f.jobs.segment.job import run

    values = options_of(ctx, config_file, "input", "output", json_mode=json_report)
    values["storage_options_json"] = values.pop("storage_options")
    values["json"] = values.pop("json_report")
    config = SegmentConfig(**values, config_file=config_file)
    raise typer.Exit(run(config))


@app.command()
def train(
    ctx: typer.Context,
    data: Annotated[str | None, typer.Argument(help="Dataset root URI (see --format for the expected layout).")] = None,
    output: Annotated[
        str | None, typer.Argument(help="Where checkpoints and metrics.jsonl go (local or object storage).")
    ] = None,
    config_file: ConfigOpt = None,
    format: Annotated[str, DataOpt(help="Annotation format under DATA.", **one_of(*DATA_FORMATS))] = T.format,
    annotations: Annotated[
        str | None, DataOpt(help="Annotation JSON (default: DATA/panoptic.json or instances.json).")
    ] = None,
    images: Annotated[str | None, DataOpt(help="Image folder (default: DATA/images).")] = None,
    masks: Annotated[
        str | None, DataOpt(help="Panoptic PNG or semantic mask folder (default: DATA/panoptic|semantic).")
    ] = None,
    init: Annotated[str | None, ModelOpt(help="Start from this checkpoint (any format model.load reads).")] = None,
    arch: Annotated[str, ModelOpt(help="Architecture when training from scratch: tiny, r50, swin_t, ...")] = T.arch,
    workers: Annotated[int, ComputeOpt(min=1, help="Ray Train workers (DDP).")] = 1,
    use_gpu: Annotated[bool, ComputeOpt(help="One GPU per worker; AMP on.")] = False,
    max_steps: Annotated[int | None, RunOpt(help="Stop after this many optimizer steps.")] = None,
    epochs: Annotated[float | None, RunOpt(help="Or: passes over the data (default 1 when no --max-steps).")] = None,
    batch_size: Annotated[int, ComputeOpt(min=1, help="Images per worker per step.")] = T.batch_size,
    lr: Annotated[float, RunOpt(help="AdamW learning rate.")] = T.lr,
    weight_decay: Annotated[float, RunOpt(help="AdamW weight decay (not on norms and embeddings).")] = T.weight_decay,
    backbone_lr_mult: Annotated[float, RunOpt(help="Backbone learning-rate multiplier.")] = T.backbone_lr_mult,
    clip_grad: Annotated[float, RunOpt(help="Clip the full-model gradient norm to this (0: off).")] = T.clip_grad,
    warmup_steps: Annotated[int, RunOpt(help="Linear warm-up steps before the poly decay.")] = T.warmup_steps,
    image_size: Annotated[int, DataOpt(help="Training crop size (large-scale jitter output).")] = T.image_size,
    min_scale: Annotated[float, DataOpt(help="Large-scale jitter: smallest scale.")] = T.min_scale,
    max_scale: Annotated[float, DataOpt(help="Large-scale jitter: largest scale.")] = T.max_scale,
    num_points: Annotated[int, RunOpt(help="Points per mask for matching and mask losses.")] = T.num_points,
    checkpoint_every: Annotated[int, RunOpt(min=1, help="Write a checkpoint every N steps.")] = T.checkpoint_every,
    threads_per_worker: Annotated[
        int, ComputeOpt(min=1, help="Torch threads (and CPUs) per worker.")
    ] = T.threads_per_worker,
    seed: Annotated[int, RunOpt(help="Random seed.")] = T.seed,
    endpoint_url: EndpointOpt = None,
    storage_options: StorageOpt = None,
    ray_address: RayAddressOpt = None,
) -> None:
    """Fine-tune (or train from scratch) on Ray Train; resumes from OUTPUT's latest checkpoint."""
    from m2f.jobs.train.job import run

    values = options_of(ctx, config_file, "data", "output")
    uris = ("data", "output", "annotations", "images", "masks", "init", "endpoint_url")
    checked_uris(**{name.upper() if name in ("data", "output") else name: values[name] for name in uris})
    storage_of(values["endpoint_url"], values["storage_options"])  # a bad --storage-options: one line, exit 2
    values["storage_options_json"] = values.pop("storage_options")
    config = TrainConfig(**values)
    raise typer.Exit(run(config))


@app.command()
def evaluate(
    predictions: Annotated[str, typer.Argument(help="OUTPUT of `m2f segment` (its Parquet dataset).")],
    ground_truth: Annotated[
        str,
        typer.Argument(
            help="COCO instances JSON, COCO panoptic JSON, or (semantic) a folder of label PNGs holding class "
            "indices, 255 = ignore."
        ),
    ],
    gt_format: Annotated[str, typer.Option(help="Ground-truth format.", **one_of(*DATA_FORMATS))] = "coco-panoptic",
    masks: Annotated[
        str | None, typer.Option(help="coco-panoptic only: the PNG folder (default: beside the JSON, same stem).")
    ] = None,
    categories: Annotated[
        str | None,
        typer.Option(
            help="semantic only: JSON with the COCO-style categories the label PNGs index, sorted by id "
            "(default: categories.json or ../panoptic.json beside the folder)."
        ),
    ] = None,
    json_out: Annotated[
        str | None,
        typer.Option(
            "--json",
            help="Also write the metrics as JSON to this file; '-': as the last line of stdout, in one line, "
            "with the table and warnings on stderr.",
        ),
    ] = None,
    endpoint_url: EndpointOpt = None,
    storage_options: StorageOpt = None,
) -> None:
    """Score a segmentation run against ground truth: mask AP, PQ/SQ/RQ, mIoU (matched by file name).

    Warns (stderr, and "warnings" in the JSON) when the run's task or --score-threshold biases the metric;
    semantic predictions against coco-instances are refused (exit 2): their AP is not instance AP.
    """
    values = dict(locals())  # the parameters, before anything else is bound here
    from m2f.jobs.evaluate.job import EvaluateConfig, run

    checked_uris(PREDICTIONS=predictions, GROUND_TRUTH=ground_truth, masks=masks, categories=categories)
    checked_uris(json=json_out, endpoint_url=endpoint_url)
    storage_of(endpoint_url, storage_options)
    values["storage_options_json"] = values.pop("storage_options")
    raise typer.Exit(run(EvaluateConfig(**values)))


@app.command("export-coco")
def export_coco(
    predictions: Annotated[str, typer.Argument(help="OUTPUT of `m2f segment`.")],
    results: Annotated[
        str, typer.Argument(help="JSON to write (panoptic: its PNGs go in the folder of the same name without .json).")
    ],
    ground_truth: Annotated[
        str | None, typer.Option("--gt", help="COCO JSON whose image ids the results must use (matched by file name).")
    ] = None,
    result_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="instances: COCO results JSON, thing segments only. panoptic: COCO panoptic JSON + RGB PNGs, "
            "as panopticapi's pq_compute reads them.",
        ),
    ] = "instances",
    endpoint_url: EndpointOpt = None,
    storage_options: StorageOpt = None,
) -> None:
    """Write a segmentation run as COCO results (what any COCO evaluation tool reads).

    Without --gt, image ids are int(image_id[:13], 16): 52 bits, so every JSON reader keeps them exact;
    stable, but not those of any COCO file.
    """
    from m2f.jobs.evaluate.export_coco import export_coco as export

    checked_uris(PREDICTIONS=predictions, RESULTS=results, gt=ground_truth, endpoint_url=endpoint_url)
    storage, fmt = storage_of(endpoint_url, storage_options), result_format
    raise typer.Exit(export(predictions, results, ground_truth, storage=storage, result_format=fmt))


@app.command()
def synth(
    output: Annotated[str, typer.Argument(help="Where to write the synthetic dataset (local path or URI).")],
    n: Annotated[int, typer.Option(min=1, help="Number of images.")] = 100,
    seed: Annotated[int, typer.Option(help="Seed; the seed alone determines the data.")] = 0,
    endpoint_url: EndpointOpt = None,
    storage_options: StorageOpt = None,
) -> None:
    """Generate synthetic scenes (sky, ground, circles, rectangles, triangles) in COCO formats."""
    from m2f.jobs.train.synth import run

    checked_uris(OUTPUT=output, endpoint_url=endpoint_url)
    raise typer.Exit(run(output, n, seed, storage=storage_of(endpoint_url, storage_options)))


models_app = typer.Typer(
    no_args_is_help=False,
    help="The official Mask2Former checkpoints by name: list them, or copy one for a cluster without internet.",
)
app.add_typer(models_app, name="models")


@models_app.callback(invoke_without_command=True)
def models(
    ctx: typer.Context,
    json_out: Annotated[bool, typer.Option("--json", help="The catalog as one JSON line on stdout.")] = False,
) -> None:
    """List the official checkpoints (Mask2Former's model zoo): name, task, dataset, backbone, metrics, URL.

    Any of them runs as `m2f segment ... --model zoo:NAME` (or NAME); so do an http(s) URL and a Hugging Face
    hub id (OWNER/NAME[@REVISION]). Weights are fetched once per run into a cache (M2F_CACHE; hub ids into
    Hugging Face's cache).
    """
    if ctx.invoked_subcommand is None:
        from m2f.jobs.models import list_models

        raise typer.Exit(list_models(json_mode=json_out))


@models_app.command("download")
def models_download(
    name: Annotated[str, typer.Argument(help="A zoo name, an http(s) URL or a Hugging Face hub id.")],
    dest: Annotated[str, typer.Argument(help="Where to copy it: a folder or URI every node reads (s3://...).")],
    endpoint_url: EndpointOpt = None,
    storage_options: StorageOpt = None,
) -> None:
    """Fetch a checkpoint here and copy it to DEST, for a cluster without internet: then --model DEST."""
    from m2f.jobs.models import download_model

    checked_uris(NAME=name, DEST=dest, endpoint_url=endpoint_url)
    raise typer.Exit(download_model(name, dest, storage_of(endpoint_url, storage_options)))


if __name__ == "__main__":  # pragma: no cover
    app()
