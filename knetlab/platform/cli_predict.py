"""`knetlab predict MODEL INPUT... --out DIR`: a trained model (checkpoint, run folder, s3://, runs:/, models:/) on
image files, folders and s3:// prefixes. Per image, under DIR at the image's relative name:
    NAME.png          semantic: class index per pixel; panoptic: COCO panoptic PNG; instance: 16-bit instance ids
    NAME.json         the classes present (semantic) or the segments / instances with category, score and area
    NAME.overlay.jpg  the prediction over the image with a legend of the classes present (same size as the image)
Images are decoded ahead on two threads and outputs written on two more; consecutive images of the same working
size go to the model together (up to --batch-size). An image that cannot be read or predicted is named and skipped;
the others are done, and the command then exits with code 2."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from knetlab.redact import redact

if TYPE_CHECKING:  # numpy, torch and the model code load when the command runs, not with `knetlab --help`
    import numpy as np

    from knetlab.platform.predict_inputs import ImageInput

OVERLAY_FORMATS = ("jpg", "png", "none")


def add_parser(commands: Any) -> argparse.ArgumentParser:
    sub = commands.add_parser("predict", help="predict label maps and overlays for your images",
                              description="run a trained model on images: label PNG, JSON and overlay per image")
    sub.add_argument("model", metavar="MODEL",
                     help="checkpoint directory or a run's checkpoint folder (local or s3://), runs:/RUN_ID or "
                          "models:/NAME@ALIAS (MLflow at $MLFLOW_TRACKING_URI, else runs/mlflow.db)")
    sub.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (recursive) or s3:// prefixes")
    sub.add_argument("--out", required=True, metavar="DIR", help="output folder")
    sub.add_argument("--batch-size", type=int, default=4, metavar="N",
                     help="images per forward pass (images of one working size; default 4)")
    sub.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present)")
    sub.add_argument("--mode", choices=["whole", "slide"], default=None,
                     help="whole image or sliding windows of eval.crop (default: the experiment's eval.mode)")
    sub.add_argument("--ms-flip", action="store_true",
                     help="multi-scale + flip (the experiment's eval.ms_ratios and eval.flip; semantic models)")
    sub.add_argument("--no-amp", action="store_true", help="full precision on GPUs (default: bf16/fp16 autocast)")
    sub.add_argument("--overlay", choices=OVERLAY_FORMATS, default="jpg", help="overlay format (default: jpg)")
    sub.set_defaults(handler=cmd_predict)
    return sub


def cmd_predict(args: argparse.Namespace) -> int:
    from knetlab.platform.predict_inputs import PredictError

    if args.batch_size < 1:
        raise PredictError(f"--batch-size must be >= 1, got {args.batch_size}")
    run_predict(args.model, args.inputs, args.out, batch_size=args.batch_size, device=args.device,
                ms_flip=args.ms_flip, mode=args.mode, amp=not args.no_amp, overlay_format=args.overlay)
    return 0


@dataclass
class Progress:
    total: int
    done: int = 0
    start: float = field(default_factory=time.perf_counter)
    printed: float = 0.0
    shown: int = -1  # the count of the last line printed

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        return (f"[knetlab] predict: {self.done}/{self.total} images, {rate:.2f} images/s"
                + (f", ETA {eta:.0f}s" if self.done < self.total and rate > 0 else ""))


def show_progress(progress: Progress, force: bool = False) -> None:
    """One progress line at most every 2 s (rewritten in place on a terminal)."""
    now = time.perf_counter()
    if (not force and now - progress.printed < 2.0) or progress.shown == progress.done:
        return
    progress.shown = progress.done
    progress.printed = now
    end = "\r" if sys.stderr.isatty() and progress.done < progress.total else "\n"
    print(progress.line(), end=end, file=sys.stderr, flush=True)


def run_predict(model_uri: str, inputs: Sequence[str], out_dir: str | Path, *, batch_size: int = 4,
                device: str | None = None, ms_flip: bool = False, mode: str | None = None, amp: bool = True,
                overlay_format: str = "jpg") -> dict[str, Any]:
    """Predict every input image into `out_dir`; raises PredictError naming the images that failed (after doing the
    rest). Returns {"predicted": n, "failed": [(source, reason)], "seconds": s}."""
    from knetlab.platform.predict_inputs import PredictError, list_inputs
    from knetlab.platform.predictor import load_predictor, predict_images, working_size

    items = list_inputs(inputs)
    out = Path(out_dir)
    check_outputs_apart(items, out)
    predictor = load_predictor(model_uri, device=device, ms_flip=ms_flip, mode=mode, amp=amp)
    settings = predictor.settings
    print(f"[knetlab] predicting {len(items)} image(s) with {predictor.cfg.model.name} ({predictor.task}) on "
          f"{predictor.device}{' with AMP' if predictor.amp_dtype else ''}: {settings['mode']}"
          f"{' + ms/flip' if ms_flip else ''} at test scale {tuple(settings['test_scale'])}; outputs in {out}",
          file=sys.stderr, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    failed: list[tuple[str, str]] = []
    progress = Progress(len(items))

    def fail(item: ImageInput, error: BaseException, counted: bool = False) -> None:
        reason = " ".join(redact(str(error) or type(error).__name__).split())
        failed.append((item.source, reason))
        progress.done += 0 if counted else 1
        print(f"[knetlab] skipped {redact(item.source)}: {reason.removeprefix(item.source + ': ')}",
              file=sys.stderr, flush=True)

    with ThreadPoolExecutor(2, thread_name_prefix="predict-read") as readers, \
            ThreadPoolExecutor(2, thread_name_prefix="predict-write") as writers:
        writes: deque[tuple[ImageInput, Future]] = deque()

        def settle(limit: int) -> None:
            while len(writes) > limit:
                item, future = writes.popleft()
                if future.exception() is not None:
                    fail(item, future.exception(), counted=True)

        def run_batch(batch: list[tuple[ImageInput, np.ndarray]]) -> None:
            try:
                results = predict_images(predictor, [image for _, image in batch])
            except Exception as error:
                if len(batch) > 1:  # find the image that fails; the others are predicted alone
                    for one in batch:
                        run_batch([one])
                    return
                fail(batch[0][0], error)
                show_progress(progress)
                return
            for (item, image), result in zip(batch, results):
                writes.append((item, writers.submit(write_outputs, predictor, item, image, result, out,
                                                    overlay_format, model_uri)))
            progress.done += len(batch)
            settle(limit=8)
            show_progress(progress)

        batch: list[tuple[ImageInput, np.ndarray]] = []
        for item, image, error in read_ahead(items, readers, ahead=max(4, 2 * batch_size)):
            if error is not None:
                fail(item, error)
                continue
            if batch and (len(batch) >= batch_size or
                          working_size(predictor, image.shape[:2]) != working_size(predictor, batch[0][1].shape[:2])):
                run_batch(batch)
                batch = []
            batch.append((item, image))
        if batch:
            run_batch(batch)
        settle(limit=0)
    show_progress(progress, force=True)
    seconds = time.perf_counter() - progress.start
    predicted = len(items) - len(failed)
    print(f"[knetlab] predicted {predicted} image(s) in {seconds:.1f}s ({predicted / max(seconds, 1e-9):.2f} images/s)"
          f"; outputs in {out}", file=sys.stderr, flush=True)
    if failed:
        names = ", ".join(redact(source) for source, _ in failed[:5]) + (", ..." if len(failed) > 5 else "")
        raise PredictError(f"{len(failed)} of {len(items)} image(s) failed and were skipped: {names} (the "
                           f"{predicted} other(s) are in {out})")
    return {"predicted": predicted, "failed": failed, "seconds": seconds}


def read_ahead(items: list[ImageInput], pool: ThreadPoolExecutor, ahead: int
               ) -> Iterator[tuple[ImageInput, np.ndarray | None, BaseException | None]]:
    """(item, image, None) or (item, None, error) in order, decoding up to `ahead` images in advance."""
    from knetlab.platform.predict_inputs import read_image

    queue: deque[tuple[ImageInput, Future]] = deque()
    position = 0
    while position < len(items) or queue:
        while position < len(items) and len(queue) < ahead:
            queue.append((items[position], pool.submit(read_image, items[position])))
            position += 1
        item, future = queue.popleft()
        error = future.exception()
        yield item, (None if error is not None else future.result()), error


def check_outputs_apart(items: list[ImageInput], out: Path) -> None:
    """No output may overwrite an input (e.g. --out the input folder with PNG inputs)."""
    from knetlab.platform.predict_inputs import PredictError

    sources = {str(Path(item.source).resolve()) for item in items if "://" not in item.source}
    for item in items:
        for suffix in (".png", ".json", ".overlay.jpg", ".overlay.png"):
            if str((out / f"{item.name}{suffix}").resolve()) in sources:
                raise PredictError(f"--out {out}: {item.name}{suffix} would overwrite the input image of that name; "
                                   "choose another output folder")


def write_outputs(predictor: Any, item: ImageInput, image: np.ndarray, result: dict[str, Any], out: Path,
                  overlay_format: str, model_uri: str) -> None:
    from knetlab.evaluation import prediction_files as files

    base = out / item.name
    info: dict[str, Any] = {"image": redact(item.source), "height": int(image.shape[0]), "width": int(image.shape[1]),
                            "model": redact(model_uri), "task": predictor.task}
    segment_ids = result.get("segment_ids")
    if predictor.task == "semantic":
        files.write_label_png(f"{base}.png", result["labels"])
        info["classes"] = files.classes_present(result["labels"], predictor.names)
    else:
        write = files.write_panoptic_png if predictor.task == "panoptic" else files.write_instance_png
        write(f"{base}.png", segment_ids)
        key = "segments_info" if predictor.task == "panoptic" else "instances"
        info["file_name"] = f"{Path(item.name).name}.png"
        info[key] = [{**segment, "name": predictor.names[segment["category"]],
                      "category_id": coco_category_id(segment["category"], predictor.task)}
                     for segment in result["segments"]]
    Path(f"{base}.json").write_text(json.dumps(info, indent=1))
    if overlay_format != "none":
        picture = files.overlay(image, result["labels"], predictor.palette, predictor.names, segment_ids=segment_ids)
        files.write_overlay(f"{base}.overlay.{overlay_format}", picture)


def coco_category_id(label: int, task: str) -> int | None:
    from knetlab.data.coco_categories import label_to_category_id

    try:
        return label_to_category_id(label, task)
    except ValueError:
        return None
