"""export, verify and package: the commands that make and check deployable files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..formats import FORMATS, FP32_PARITY, REDUCED_PARITY, exportable, option_types, written_as
from .common import cache_dir_option, cli, data_dir_option, no_download_option, positive

FORMAT_NAMES = exportable()  # the registry's exportable formats


def _format_options(command):
    """One --option per field of the registry's format option dataclasses: type, choices, default and
    --help all come from the dataclass (a field shared by several formats, like opset, appears once)."""
    for name, f in reversed(list(option_types().items())):
        choices, minimum = f.metadata.get("choices"), f.metadata.get("minimum")
        if choices:
            kind = click.Choice(list(choices))
        elif isinstance(f.default, int):
            kind = int
        elif isinstance(f.default, float):
            kind = float
        else:
            kind = str
        command = click.option("--" + name.replace("_", "-"), name, type=kind, default=f.default, show_default=True,
                               help=f.metadata.get("help", ""))(command)
        del minimum  # checked by the library (InputError, exit 2), with the same message as from Python
    return command




@cli.command("export")
@click.option("--format", "formats", type=click.Choice([*FORMAT_NAMES, "all"]), multiple=True,
              default=("all",), show_default=True,
              help="Format to export; repeat the option for several. all: every format that can run here "
              "(the others are listed as skipped). "
              + " ".join(f"{f.name}: {f.deprecated}." for f in FORMATS.values() if f.deprecated))
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The state_dict to export; the manifest.json next to it says which model to rebuild. "
              "Default: OUT/mnist_model_state_dict.pth.")
@click.option("--out", "--artifacts", "out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("artifacts"), show_default=True,
              help="Folder the artifacts, manifest.json and parity.json are written to.")
@_format_options
@click.option("--atol", type=float, default=None,
              help=f"Parity: largest allowed |logit - PyTorch logit| (plus --rtol x |PyTorch logit|). "
              f"Default: {FP32_PARITY.atol:g}.")
@click.option("--rtol", type=float, default=None, help=f"Parity: relative tolerance. Default: {FP32_PARITY.rtol:g}.")
@click.option("--min-agreement", type=float, default=None,
              help="Parity: smallest allowed fraction of images with the same predicted digit (fp32 formats). "
              f"Default: {FP32_PARITY.min_agreement:g}.")
@click.option("--int8-min-agreement", type=float, default=None,
              help="Reduced-precision formats (" + ", ".join(n for n, f in FORMATS.items() if f.parity.kind == "predictions")
              + f"): smallest allowed top-1 agreement with the fp32 model. Default: {REDUCED_PARITY.min_agreement:g}.")
@click.option("--int8-max-accuracy-drop", type=float, default=None,
              help="Reduced-precision formats: largest allowed accuracy drop, as a fraction (0.003 = 0.3 points). "
              f"Default: {REDUCED_PARITY.max_accuracy_drop:g}.")
@click.option("--no-parity", is_flag=True, help="Skip the parity gate (experiments only; verify still checks).")
@click.option("--parity-images", type=click.IntRange(min=1), default=None, metavar="N",
              help="Judge parity on the first N test images only (quick runs). Default: all 10,000.")
@data_dir_option
@cache_dir_option
@no_download_option
@click.option("--markdown", is_flag=True, help="Print the parity table as Markdown.")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
def export_cmd(formats, checkpoint, out, atol, rtol, min_agreement, int8_min_agreement, int8_max_accuracy_drop,
               no_parity, parity_images, data_dir, cache_dir, no_download, markdown, as_json, **options) -> None:
    """Export the trained model to deployable formats and prove each computes what PyTorch computes.

    Every artifact is run on all 10,000 test images at batch sizes 1 and 10,000 and compared with
    the PyTorch model: logits within --atol/--rtol and top-1 agreement for the fp32 formats,
    agreement and accuracy drop for reduced-precision ones (INT8, bf16). A format that fails is
    recorded in manifest.json as failed and its files removed; the exit code is then 1. An I/O
    error (a full disk) keeps the previous artifact. Results also go to parity.json.
    """
    from ..export.parity import would_pass_hint
    from ..export.run import ExportConfig, export_artifacts

    def progress(name):
        if not as_json:
            click.echo(f"exporting {name} ...", err=True)

    config = ExportConfig.from_arguments(
        formats=formats, atol=atol, rtol=rtol, min_agreement=min_agreement, int8_min_agreement=int8_min_agreement,
        int8_max_accuracy_drop=int8_max_accuracy_drop, parity=not no_parity, parity_images=parity_images, **options,
    )
    report = export_artifacts(config, artifacts=out, checkpoint=checkpoint, data_dir=data_dir, cache_dir=cache_dir,
                              allow_download=not no_download, progress=progress)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        n = report.test_images
        click.echo(f"{report.model} from {report.source_state_dict_sha256[:12]}...: parity on {n:,} test "
                   f"images at batch sizes 1 and {min(n, 10_000):,} against PyTorch eager")
        click.echo(report.table(markdown=markdown))
        reduced = [r.format for r in report.results if (r.parity or {}).get("criteria", {}).get("kind") == "predictions"]
        if reduced:
            c = next(r.parity["criteria"] for r in report.results if r.format == reduced[0])
            click.echo(f"{', '.join(reduced)}: judged on predictions, not logits: agreement >= "
                       f"{100 * c['min_agreement']:.2f}% and accuracy drop <= {100 * c['max_accuracy_drop']:.2f} points")
        for r in report.results:
            if r.status == "ok":
                click.echo(f"{out / r.file}  {r.size_bytes:,} bytes  {r.export_seconds:.2f} s")
            elif r.status == "skipped":
                click.echo(f"{r.format}: skipped: {r.error}")
        if report.parity_path:
            click.echo(f"parity report: {report.parity_path}; manifest: {out / 'manifest.json'}")
    for r in report.failures:
        if r.status == "error":
            click.secho(f"error: {r.format}: {r.error}", fg="red", err=True)
            continue
        hint = would_pass_hint((r.parity or {}).get("criteria", {}).get("kind", "logits"),
                               (r.parity or {}).get("would_pass_with"))
        hint = f" ({hint})" if hint else ""
        click.secho(f"error: {r.format}: {r.error}{hint}; recorded as failed in the manifest, file removed",
                    fg="red", err=True)
    if not report.ok:
        sys.exit(1)


@cli.command("verify")
@click.option("--artifacts", "--out", "artifacts", type=click.Path(file_okay=False, path_type=Path),
              default=Path("artifacts"), show_default=True)
@data_dir_option
@cache_dir_option
@no_download_option
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
def verify_cmd(artifacts, data_dir, cache_dir, no_download, as_json) -> None:
    """Re-check every artifact in the manifest: sha256, loads in its runtime, parity still holds.

    Exit code 1 and one line per problem when anything does not check out.
    """
    from ..export.run import verify_artifacts

    report = verify_artifacts(artifacts=artifacts, data_dir=data_dir, cache_dir=cache_dir,
                              allow_download=not no_download)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for item in report.items:
            status = "OK  " if item.ok else "FAIL"
            click.echo(f"{status} {item.key:<18} {item.path or '-':<30} {', '.join(item.checks) or '-'}")
    for problem in report.problems:
        click.secho(f"error: {problem}", fg="red", err=True)
    if not report.ok:
        sys.exit(1)
    if not as_json:
        n = sum(1 for i in report.items if i.parity)
        click.echo(f"all {len(report.items)} artifacts verified ({n} formats re-checked for parity)")



PACKAGE_FORMATS = written_as(".onnx")  # the registry's formats written as .onnx files


@cli.command("package")
@click.option("--artifacts", type=click.Path(file_okay=False, path_type=Path), default=Path("artifacts"),
              show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("package"), show_default=True,
              help="Folder to write model_repository/ and inferenceservice.yaml into.")
@click.option("--format", "fmt", type=click.Choice(PACKAGE_FORMATS), default="onnx", show_default=True,
              help="Which ONNX export to package (it must have passed its parity gate).")
@click.option("--name", default=None, help="Model name on Triton and KServe. Default: the manifest's model name.")
@click.option("--model-version", type=int, default=1, show_default=True, callback=positive,
              help="Triton version folder.")
@click.option("--max-batch-size", type=int, default=256, show_default=True, callback=positive)
@click.option("--max-queue-delay-us", type=click.IntRange(0), default=0, show_default=True,
              help="Dynamic batching: longest a request waits for others to join its batch.")
@click.option("--preferred-batch-size", "preferred", type=int, multiple=True,
              help="Dynamic batching: a preferred batch size (repeatable).")
@click.option("--instances", type=int, default=1, show_default=True, callback=positive,
              help="Model instances (instance_group count).")
@click.option("--instance-kind", type=click.Choice(["cpu", "gpu", "auto"]), default="cpu", show_default=True)
@click.option("--storage-uri", default=None,
              help="KServe storageUri of the uploaded model_repository folder. Default: a placeholder to fill in.")
@click.option("--image", default=None,
              help="Container image of this server for deployment.yaml (the package and the artifacts folder at "
                   "/app/artifacts). Default: a placeholder to fill in.")
@click.option("--replicas", type=int, default=1, show_default=True, callback=positive,
              help="Pods of the Deployment in deployment.yaml.")
@click.option("--drain-timeout", type=click.FloatRange(0.1, 3600), default=30.0, show_default=True,
              help="serve's --drain-timeout in deployment.yaml; the pod's termination grace period is set above it.")
@click.option("--overwrite", is_flag=True, help="Replace an existing model folder of the same name.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def package_cmd(artifacts, out, fmt, name, model_version, max_batch_size, max_queue_delay_us, preferred, instances,
                instance_kind, storage_uri, image, replicas, drain_timeout, overwrite, as_json) -> None:
    """Package the ONNX export for a cluster: a Triton model repository, a KServe InferenceService, and a
    Kubernetes Deployment + Service running this server.

    Writes OUT/model_repository/NAME/config.pbtxt (platform onnxruntime_onnx, dynamic batching),
    OUT/model_repository/NAME/VERSION/model.onnx (the export, checked against the manifest's sha256),
    OUT/inferenceservice.yaml (KServe v1beta1, modelFormat onnx, protocol v2) and OUT/deployment.yaml
    (`mnist-deploy serve` with startup, readiness and liveness probes on /v2/health/ready and
    /v2/health/live). Run the repository with `tritonserver --model-repository OUT/model_repository`,
    or upload it and apply the YAML.
    """
    import time

    from ..package import IMAGE_PLACEHOLDER, STORAGE_URI_PLACEHOLDER, PackageConfig, package_artifacts

    t0 = time.perf_counter()
    cfg = PackageConfig(name=name, format=fmt, version=model_version, max_batch_size=max_batch_size,
                        max_queue_delay_us=max_queue_delay_us, preferred_batch_sizes=tuple(preferred),
                        instances=instances, instance_kind=instance_kind,
                        storage_uri=storage_uri or STORAGE_URI_PLACEHOLDER, overwrite=overwrite,
                        image=IMAGE_PLACEHOLDER if image is None else image, replicas=replicas, drain_timeout=drain_timeout)
    result = package_artifacts(artifacts=artifacts, out=out, config=cfg)
    seconds = time.perf_counter() - t0
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
        return
    click.echo(f"{result.model_path}  {result.size_bytes:,} bytes  sha256 {result.sha256[:12]}...  {seconds:.2f} s")
    click.echo(f"{result.config_path}  platform onnxruntime_onnx, max_batch_size {max_batch_size}, "
               f"inputs {', '.join(f'{s.name} {s.datatype} {list(s.dims)}' for s in result.inputs)}")
    click.echo(f"{result.inference_service_path}  KServe InferenceService '{result.name}'")
    click.echo(f"{result.deployment_path}  Deployment + Service '{result.name}' running `mnist-deploy serve`")
    if storage_uri is None:
        click.echo("fill in storageUri in the InferenceService once the repository is uploaded", err=True)
    if image is None:
        click.echo("fill in the image in deployment.yaml (or pass --image)", err=True)


