"""A semantic dataset's classes: names and RGB palette in label order. `dataset_classes(cfg.data, num_classes)` is the
one place every part gets them from (training metrics and artifacts, `knetlab eval`, `knetlab data check`, predict and
export); `class_names(cfg)` is its names.

Where they come from, first match wins: the experiment's `data.classes` (with `data.palette`), `data.classes_file`
(a local path or s3:// URI), a `classes.txt` / `classes.yaml` beside the data (in `data.root` or its
`ADEChallengeData2016/`), else ADE20K's 150 (or `class_0..` names when `model.num_classes` is another count).

classes.txt: one class per line in label order, optionally followed by its colour (`R G B` or `#RRGGBB`; all lines
or none); blank lines and lines starting with `#` are skipped. classes.yaml: `classes:` a list of names or of
`{name: ..., color: [R, G, B]}`, and optionally `reduce_zero_label: true|false` (the dataset's label encoding)."""

from __future__ import annotations

import colorsys
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from knetlab.data.errors import DatasetError

CLASSES_FILE_NAMES = ("classes.txt", "classes.yaml", "classes.yml")
MAX_CLASSES = 255  # label 255 is the ignore index
ADE20K_SOURCE = "ADE20K"  # DatasetClasses.source of ADE20K's own classes
GENERIC_SOURCE = "class_<id>"  # ... of unnamed classes (a count without names)
_RGB_SUFFIX = re.compile(r"^(?P<name>.*?)\s+(?P<r>\d+)\s+(?P<g>\d+)\s+(?P<b>\d+)$")
_HEX_SUFFIX = re.compile(r"^(?P<name>.*?)\s+#(?P<hex>[0-9a-fA-F]{6})$")
YAML_KEYS = ("classes", "reduce_zero_label")

Colour = tuple[int, int, int]


@dataclass(frozen=True)
class DatasetClasses:
    """Class names and palette in label order; `source` says where they came from (`data.classes`, a file, ADE20K,
    class_<id>); `reduce_zero_label` is what a classes YAML declares (None: it says nothing)."""

    names: tuple[str, ...]
    palette: tuple[Colour, ...]
    source: str
    reduce_zero_label: bool | None = None

    @property
    def own(self) -> bool:
        """The dataset names its own classes (not ADE20K's, not class_<id>)."""
        return self.source not in (ADE20K_SOURCE, GENERIC_SOURCE)

    @property
    def default_reduce_zero_label(self) -> bool:
        """The label encoding when `data.reduce_zero_label` is null: the classes YAML's, else ADE20K's (0 = other,
        k = class k - 1) for ADE20K's and unnamed classes, else labels 0..N-1 with 255 ignored for a dataset's own."""
        return self.reduce_zero_label if self.reduce_zero_label is not None else not self.own


def generated_palette(count: int) -> tuple[Colour, ...]:
    """`count` distinct, deterministic colours (hues by the golden ratio, two brightness levels)."""
    colours = []
    for index in range(count):
        hue = (index * 0.618033988749895) % 1.0
        value = 0.95 if index % 2 == 0 else 0.7
        r, g, b = colorsys.hsv_to_rgb(hue, 0.75, value)
        colours.append((round(r * 255), round(g * 255), round(b * 255)))
    return tuple(colours)


def make_classes(names: Sequence[Any], palette: Sequence[Any] | None, source: str, where: str = "",
                 reduce_zero_label: bool | None = None) -> DatasetClasses:
    """Checked `DatasetClasses`: 1..255 distinct non-empty names, one RGB colour (0..255 each) per class or none
    (then generated). Errors start with `where` (e.g. the file, or `config.yaml: data.classes`)."""
    where = where or source
    if not names:
        raise DatasetError(f"{where}: no class names")
    if len(names) > MAX_CLASSES:
        raise DatasetError(f"{where}: {len(names)} classes; at most {MAX_CLASSES} (label 255 is the ignore index)")
    checked: list[str] = []
    for index, name in enumerate(names):
        if not isinstance(name, str) or not name.strip() or any(c in name for c in "\n\r\t"):
            raise DatasetError(f"{where}: class {index} must be a non-empty one-line name, got {name!r}")
        if name.strip() in checked:
            first = checked.index(name.strip())
            raise DatasetError(f"{where}: class name {name.strip()!r} appears twice (classes {first} and {index}); "
                               f"names must be distinct")
        checked.append(name.strip())
    if palette is None or len(palette) == 0:
        colours = generated_palette(len(checked))
    else:
        if len(palette) != len(checked):
            raise DatasetError(f"{where}: {len(palette)} palette colours for {len(checked)} classes; give one "
                               f"[R, G, B] per class or none")
        colours = tuple(check_colour(colour, f"{where}: colour of class {i} ({checked[i]!r})")
                        for i, colour in enumerate(palette))
    return DatasetClasses(tuple(checked), colours, source, reduce_zero_label)


def check_colour(colour: Any, where: str) -> Colour:
    values = list(colour) if isinstance(colour, (list, tuple)) else None
    if (values is None or len(values) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values)
            or not all(0 <= v <= 255 for v in values)):
        raise DatasetError(f"{where}: expected [R, G, B] with integers in 0..255, got {colour!r}")
    return (values[0], values[1], values[2])


def parse_classes_text(text: str, source: str) -> DatasetClasses:
    """classes.txt (see the module docstring); errors name `source:LINE`."""
    names: list[str] = []
    colours: list[Colour | None] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{lineno}"
        rgb, hexa = _RGB_SUFFIX.match(line), _HEX_SUFFIX.match(line)
        if rgb:
            name, colour = rgb["name"], check_colour([int(rgb[c]) for c in "rgb"], where)
        elif hexa:
            name, colour = hexa["name"], tuple(int(hexa["hex"][i:i + 2], 16) for i in (0, 2, 4))
        else:
            name, colour = line, None
        if colours and (colour is None) != (colours[0] is None):
            raise DatasetError(f"{where}: {name!r} {'has no' if colour is None else 'has a'} colour but the first "
                               f"class {'has one' if colour is None else 'has none'}; give every class a colour "
                               f"(R G B or #RRGGBB after the name) or none")
        if name in names:
            raise DatasetError(f"{where}: class name {name!r} appears twice (also class {names.index(name)}); "
                               f"names must be distinct")
        names.append(name)
        colours.append(colour)  # type: ignore[arg-type]
    if not names:
        raise DatasetError(f"{source}: no class names (one per line, in label order)")
    palette = None if colours[0] is None else colours
    return make_classes(names, palette, source)


def parse_classes_yaml(text: str, source: str) -> DatasetClasses:
    """classes.yaml (see the module docstring): `classes:` names or {name, color} mappings, `reduce_zero_label`."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise DatasetError(f"{source}: not valid YAML ({' '.join(str(error).split())[:200]})") from None
    if isinstance(data, list):
        data = {"classes": data}
    if not isinstance(data, dict) or "classes" not in data:
        raise DatasetError(f"{source}: expected a mapping with 'classes: [name, ...]' (and optionally "
                           f"reduce_zero_label), got {type(data).__name__}")
    unknown = sorted(set(map(str, data)) - set(YAML_KEYS))
    if unknown:
        raise DatasetError(f"{source}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(YAML_KEYS)}")
    reduce_zero_label = data.get("reduce_zero_label")
    if reduce_zero_label is not None and not isinstance(reduce_zero_label, bool):
        raise DatasetError(f"{source}: reduce_zero_label must be true or false, got {reduce_zero_label!r}")
    items = data["classes"]
    if not isinstance(items, list):
        raise DatasetError(f"{source}: classes must be a list of names or {{name, color}} mappings, got {items!r}")
    names: list[Any] = []
    colours: list[Any] = []
    for index, item in enumerate(items):
        if isinstance(item, Mapping):
            extra = sorted(set(map(str, item)) - {"name", "color"})
            if extra or "name" not in item:
                raise DatasetError(f"{source}: class {index}: expected {{name: ..., color: [R, G, B]}}, got {item!r}")
            names.append(item["name"])
            colours.append(item.get("color"))
        else:
            names.append(item)
            colours.append(None)
    given = [c is not None for c in colours]
    if any(given) and not all(given):
        missing = given.index(False)
        raise DatasetError(f"{source}: class {missing} ({names[missing]!r}) has no color but others have; give every "
                           f"class a color or none")
    return make_classes(names, colours if all(given) else None, source, reduce_zero_label=reduce_zero_label)


def read_classes_file(path: str | Path) -> DatasetClasses:
    """A classes.txt or classes.yaml/.yml file, local or s3:// (the format follows the suffix)."""
    text = _read_text(str(path))
    if str(path).lower().endswith((".yaml", ".yml")):
        return parse_classes_yaml(text, str(path))
    return parse_classes_text(text, str(path))


def _read_text(path: str) -> str:
    if path.startswith("s3://"):
        from knetlab.object_store import parse_s3_uri, s3_client

        bucket, key = parse_s3_uri(path)
        try:
            body = s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as error:  # botocore's ClientError and connection errors share no useful base
            code = getattr(error, "response", {}).get("Error", {}).get("Code") or type(error).__name__
            raise DatasetError(f"{path}: cannot read the classes file ({code})") from None
    else:
        try:
            body = Path(path).expanduser().read_bytes()
        except FileNotFoundError:
            raise DatasetError(f"{path}: classes file does not exist") from None
        except OSError as error:
            raise DatasetError(f"{path}: cannot read the classes file ({type(error).__name__}: {error})") from None
    try:
        return body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: classes file is not UTF-8 text") from None


def find_classes_file(root: str | Path) -> Path | None:
    """The classes file beside a local dataset: `classes.txt`/`.yaml`/`.yml` in `root` or `root/ADEChallengeData2016`
    (None when there is none or the root is s3://); two of them in one folder is an error."""
    if str(root).startswith("s3:/"):
        return None
    base = Path(root).expanduser()
    for folder in (base, base / "ADEChallengeData2016"):
        found = [folder / name for name in CLASSES_FILE_NAMES if (folder / name).is_file()]
        if len(found) > 1:
            raise DatasetError(f"{folder}: {len(found)} classes files ({', '.join(p.name for p in found)}); keep one")
        if found:
            return found[0]
    return None


def default_classes(num_classes: int | None) -> DatasetClasses:
    """ADE20K's 150 classes (when `num_classes` is None or 150), else `class_0..class_{n-1}` with generated colours."""
    if num_classes is None or num_classes == 150:
        from knetlab.data.ade20k import ADE20K_CLASSES, ADE20K_PALETTE

        return DatasetClasses(ADE20K_CLASSES, ADE20K_PALETTE, ADE20K_SOURCE)
    return DatasetClasses(tuple(f"class_{i}" for i in range(num_classes)), generated_palette(num_classes),
                          GENERIC_SOURCE)


def dataset_classes(data_cfg: Mapping[str, Any], num_classes: int | None = None,
                    origins: Mapping[str, str] | None = None, look_beside_data: bool = True) -> DatasetClasses:
    """The classes of an experiment's `data` section (see the module docstring for the order); `num_classes` is
    `model.num_classes` (it only matters when the dataset names no classes). `data.palette` recolours the classes
    wherever their names come from. An error in `data.classes`/`data.palette` starts with the file or override that
    set it (`origins`: dotted key -> source). With both data.classes and data.classes_file, the inline names win and
    the file is their `source` (a settled config holds both: the names and the file they came from).
    `look_beside_data=False` skips the classes file in data.root: a settled config (every config knetlab loads)
    already holds the names of any that was there when it was loaded, and a file that appeared since must not
    change what a run's classes are."""

    def where(key: str) -> str:
        return f"{origins[key]}: {key}" if origins and key in origins else key

    names = list(data_cfg.get("classes") or [])
    palette = [list(colour) for colour in data_cfg.get("palette") or []]
    classes_file = data_cfg.get("classes_file")
    if names:
        classes = make_classes(names, None, str(classes_file or "data.classes"), where=where("data.classes"))
    elif classes_file:
        classes = read_classes_file(classes_file)
    else:
        found = find_classes_file(data_cfg.get("root") or ".") if look_beside_data else None
        classes = read_classes_file(found) if found else default_classes(num_classes)
    if palette:
        recoloured = make_classes(classes.names, palette, classes.source, where=where("data.palette"))
        classes = replace(classes, palette=recoloured.palette)
    return classes


def class_names(cfg: Mapping[str, Any]) -> tuple[str, ...]:
    """The class names of a settled experiment config (what `load_config`/`config_from_container` return, a run's
    resolved config, a checkpoint's config.yaml): `dataset_classes(cfg.data, cfg.model.num_classes,
    look_beside_data=False).names`."""
    return dataset_classes(cfg["data"], cfg["model"].get("num_classes"), look_beside_data=False).names
