"""A minimal writer of OLE2 compound files (Microsoft [MS-CFB], version 3), for building Zeiss/Xradia test files.

``olefile`` only reads, so the tests write their ``.txrm``/``.xrm``/``.txm``
files with this. What it writes, per [MS-CFB] v3 (512-byte sectors):

- the 512-byte header (signature, version 3, byte order FFFE, sector shift 9,
  mini sector shift 6, mini stream cutoff 4096, up to 109 FAT sectors listed
  in the header's DIFAT: files up to about 7 MB, plenty for tests);
- then FAT sectors, directory sectors, mini FAT sectors, the mini stream
  (the root entry's stream: every stream under 4096 bytes, in 64-byte mini
  sectors), and the large streams, each one contiguous chain;
- directory entries (128 bytes each): root, one storage per path folder,
  one stream per file; a storage's children form a binary search tree in
  [MS-CFB] order (shorter name first, then upper-case comparison), built
  balanced and all black (readers walk the tree; none rebalance it).

No DIFAT sectors, no timestamps, no CLSIDs, no property sets.
"""

from __future__ import annotations

import struct

__all__ = ["write_cfb"]

_SECTOR, _MINI, _CUTOFF = 512, 64, 4096
_FREE, _END, _FATSECT, _NOSTREAM = 0xFFFFFFFF, 0xFFFFFFFE, 0xFFFFFFFD, 0xFFFFFFFF


def write_cfb(path, streams: dict) -> None:
    """Write ``{"Storage/Sub/Stream": bytes}`` as a compound file at ``path``."""
    entries = [{"name": "Root Entry", "type": 5, "kids": {}, "data": b""}]  # the tree, by storage path
    for full, data in streams.items():
        parts = full.split("/")
        node = entries[0]
        for depth, part in enumerate(parts):
            leaf = depth == len(parts) - 1
            if part not in node["kids"]:
                entries.append({"name": part, "type": 2 if leaf else 1, "kids": {}, "data": bytes(data) if leaf
                                else b""})
                node["kids"][part] = len(entries) - 1
            node = entries[node["kids"][part]]
    # Mini stream (small streams) and mini FAT.
    mini, minifat = bytearray(), []
    for e in entries[1:]:
        if e["type"] == 2 and len(e["data"]) < _CUTOFF:
            n = max(1, -(-len(e["data"]) // _MINI)) if e["data"] else 0
            e["start"] = len(mini) // _MINI if n else _END
            minifat += [len(minifat) + k + 1 for k in range(n - 1)] + ([_END] if n else [])
            mini += e["data"] + b"\0" * (n * _MINI - len(e["data"]))
    # Sector counts (FAT sectors cover every sector, themselves included).
    n_dir = -(-len(entries) * 128 // _SECTOR)
    n_minifat = -(-len(minifat) * 4 // _SECTOR)
    n_mini = -(-len(mini) // _SECTOR)
    big = [e for e in entries[1:] if e["type"] == 2 and len(e["data"]) >= _CUTOFF]
    n_big = [-(-len(e["data"]) // _SECTOR) for e in big]
    rest = n_dir + n_minifat + n_mini + sum(n_big)
    n_fat = 1
    while n_fat * 128 < n_fat + rest:
        n_fat += 1
    if n_fat > 109:
        raise ValueError("cfb_writer: file too large for a header-only DIFAT (about 7 MB)")
    fat = [_FATSECT] * n_fat
    chains = {}

    def chain(name, n):
        chains[name] = len(fat) if n else _END
        fat.extend([len(fat) + k + 1 for k in range(n - 1)] + ([_END] if n else []))

    chain("dir", n_dir)
    chain("minifat", n_minifat)
    chain("mini", n_mini)
    for e, n in zip(big, n_big):
        chain(id(e), n)
        e["start"] = chains[id(e)]
    fat += [_FREE] * (n_fat * 128 - len(fat))
    root = entries[0]
    root["start"] = chains["mini"] if mini else _END
    root["data"] = bytes(mini)
    # Directory: children of each storage as a balanced binary search tree.
    for e in entries:
        e.setdefault("left", _NOSTREAM), e.setdefault("right", _NOSTREAM)
        kids = sorted(e["kids"].values(), key=lambda i: (len(entries[i]["name"]), entries[i]["name"].upper()))
        e["child"] = _tree(kids, entries)
    directory = bytearray()
    for e in entries:
        name = e["name"].encode("utf-16-le") + b"\0\0"
        if len(name) > 64:
            raise ValueError(f"cfb_writer: name {e['name']!r} longer than 31 characters")
        size = len(e["data"])
        start = e.get("start", _END) if (e["type"] == 5 or size) else _END
        directory += struct.pack("<64sHBBIII16sIQQIQ", name, len(name), e["type"], 1, e["left"], e["right"],
                                 e["child"], b"\0" * 16, 0, 0, 0, start, size)
    directory += _unused_entries(n_dir * _SECTOR - len(directory))
    header = struct.pack("<8s16sHHHHH6sIIIIIIIII", bytes.fromhex("d0cf11e0a1b11ae1"), b"\0" * 16, 0x3E, 3, 0xFFFE,
                         9, 6, b"\0" * 6, 0, n_fat, chains["dir"], 0, _CUTOFF,
                         chains["minifat"] if n_minifat else _END, n_minifat, _END, 0)
    header += struct.pack("<109I", *(list(range(n_fat)) + [_FREE] * (109 - n_fat)))
    with open(path, "wb") as fh:
        fh.write(header)
        fh.write(struct.pack(f"<{len(fat)}I", *fat))
        fh.write(directory)
        fh.write(_pad(struct.pack(f"<{len(minifat)}I", *minifat), _SECTOR, fill=b"\xff"))
        fh.write(_pad(bytes(mini), _SECTOR))
        for e in big:
            fh.write(_pad(e["data"], _SECTOR))


def _tree(kids, entries):
    """Root index of a balanced search tree over the sorted ``kids``; sets their left/right links."""
    if not kids:
        return _NOSTREAM
    mid = len(kids) // 2
    node = entries[kids[mid]]
    node["left"] = _tree(kids[:mid], entries)
    node["right"] = _tree(kids[mid + 1:], entries)
    return kids[mid]


def _unused_entries(nbytes):
    free = struct.pack("<64sHBBIII16sIQQIQ", b"", 0, 0, 0, _NOSTREAM, _NOSTREAM, _NOSTREAM, b"\0" * 16, 0, 0, 0, 0, 0)
    return free * (nbytes // 128)


def _pad(data, size, fill=b"\0"):
    return data + fill * (-len(data) % size)
