"""HDF5 filters of the result file's stacks: ``--compression NAME[:LEVEL]``, and what a file was written with.

The fast codecs come from ``hdf5plugin`` (a required dependency: its wheel ships the filters, and
``import hdf5plugin`` registers them with HDF5 for every h5py file of the process). Which codec is the
default was decided by ``bench/write.py`` (see README "Result files"): on noisy and clean tomograms
bitshuffle + LZ4 writes 10-20x faster than gzip level 1 + shuffle at a compression ratio within about
10 % of gzip's.
"""

from __future__ import annotations

from ...core.errors import ParameterError

__all__ = ["COMPRESSIONS", "DEFAULT_COMPRESSION", "dataset_filter", "describe_filter", "FilterUnavailableError",
           "parse_compression", "register_filters"]

# NAME -> (description, default level or None when the codec has no level, (lowest, highest) level)
_CODECS = {
    "none": ("uncompressed", None, None),
    "gzip": ("gzip (deflate) + byte shuffle, any HDF5 reader", 1, (1, 9)),
    "lz4": ("bitshuffle + LZ4 (hdf5plugin)", None, None),
    "zstd": ("bitshuffle + Zstandard (hdf5plugin)", 1, (1, 22)),
    "blosc2-lz4": ("Blosc2 LZ4 + byte shuffle (hdf5plugin)", 5, (0, 9)),
    "blosc2-zstd": ("Blosc2 Zstandard + byte shuffle (hdf5plugin)", 1, (0, 9)),
}
DEFAULT_COMPRESSION = "blosc2-zstd:1"
# Every codec at its default level: what bench/write.py compares.
COMPRESSIONS = tuple(name if level is None else f"{name}:{level}" for name, (_, level, _) in _CODECS.items())

# HDF5 filter id -> name, for files written by any tool (``describe_filter``)
_FILTER_NAMES = {1: "gzip", 2: "shuffle", 3: "fletcher32", 4: "szip", 6: "scaleoffset", 307: "bzip2",
                 32001: "blosc", 32004: "lz4", 32008: "bitshuffle", 32015: "zstd", 32026: "blosc2"}
_PLUGIN_FILTERS = {32001, 32004, 32008, 32015, 32026}


class FilterUnavailableError(OSError):
    """A dataset needs an HDF5 filter plugin that is not loaded (``import hdf5plugin``)."""


def parse_compression(spec: str) -> tuple[str, int | None]:
    """``"NAME[:LEVEL]"`` -> ``(name, level)``; ``ValueError`` naming the choices for anything else.

    Parameters
    ----------
    spec : str
        One of ``none``, ``gzip[:1-9]``, ``lz4``, ``zstd[:1-22]``, ``blosc2-lz4[:0-9]``, ``blosc2-zstd[:0-9]``.

    Returns
    -------
    (str, int or None)
        The codec name and its level (the codec's default when not given; ``None`` for codecs without one).
    """
    text = str(spec).strip().lower()
    name, _, level_text = text.partition(":")
    if name not in _CODECS:
        raise ParameterError(f"compression must be one of {', '.join(_CODECS)} (optionally NAME:LEVEL), got {spec!r}")
    _, default, bounds = _CODECS[name]
    if not level_text:
        return name, default
    if bounds is None:
        raise ParameterError(f"compression {name!r} takes no level, got {spec!r}")
    try:
        level = int(level_text)
    except ValueError:
        raise ParameterError(f"compression level must be an integer, got {spec!r}") from None
    if not bounds[0] <= level <= bounds[1]:
        raise ParameterError(f"compression level of {name} must be in {bounds[0]}..{bounds[1]}, got {level}")
    return name, level


def dataset_filter(spec: str) -> dict:
    """Keyword arguments of ``h5py.Group.create_dataset`` for the codec ``spec`` (see :func:`parse_compression`)."""
    name, level = parse_compression(spec)
    if name == "none":
        return {}
    if name == "gzip":
        return {"compression": "gzip", "compression_opts": level, "shuffle": True}
    hdf5plugin = register_filters()
    if name == "lz4":
        return dict(hdf5plugin.Bitshuffle(cname="lz4"))
    if name == "zstd":
        return dict(hdf5plugin.Bitshuffle(cname="zstd", clevel=level))
    cname = name.split("-", 1)[1]
    return dict(hdf5plugin.Blosc2(cname=cname, clevel=level, filters=hdf5plugin.Blosc2.SHUFFLE))


def register_filters():
    """Import ``hdf5plugin`` (which registers its filters with HDF5) and return the module."""
    try:
        import hdf5plugin
    except ImportError as exc:  # a required dependency; only a broken install gets here
        raise FilterUnavailableError("the HDF5 compression filters need the hdf5plugin package: "
                                     "pip install hdf5plugin") from exc
    return hdf5plugin


def describe_filter(dataset) -> str:
    """The filters of an h5py dataset in words, e.g. ``"bitshuffle (lz4)"``, ``"gzip 1 + shuffle"``, ``"none"``."""
    plist = dataset.id.get_create_plist()
    names = []
    for k in range(plist.get_nfilters()):
        code, _, values, _ = plist.get_filter(k)
        name = _FILTER_NAMES.get(code, f"filter {code}")
        if code == 1 and values:
            name += f" {values[0]}"
        if code == 32008 and len(values) > 4:
            name += {2: " (lz4)", 3: " (zstd)"}.get(values[4], "")
        if code in (32001, 32026) and len(values) > 6:  # Blosc/Blosc2: level, shuffle, codec at 4, 5, 6
            codec = {0: "blosclz", 1: "lz4", 2: "lz4hc", 4: "zlib", 5: "zstd"}.get(values[6], f"codec {values[6]}")
            name += f" ({codec} {values[4]}{ {1: ' + shuffle', 2: ' + bitshuffle'}.get(values[5], '')})"
        names.append(name)
    shuffle = "shuffle" in names
    names = [n for n in names if n != "shuffle"]
    text = " + ".join(names) or "none"
    return text + (" + shuffle" if shuffle else "")


def plugin_needed(dataset) -> bool:
    """Whether reading ``dataset`` needs a filter from hdf5plugin."""
    plist = dataset.id.get_create_plist()
    return any(plist.get_filter(k)[0] in _PLUGIN_FILTERS for k in range(plist.get_nfilters()))
