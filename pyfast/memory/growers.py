"""What grows: two censuses of the live Python objects, a window of steps apart, compared.

A census (`take_census`) counts every live object by type, with its size: `sys.getsizeof`, plus
the storage bytes of each tensor (once per storage, by device). The comparison (`find_growers`),
taken at the end of the window, reports

- the types whose counts and bytes grew (top by count and by bytes);
- who holds the new objects: the old objects (lists, dicts, attributes, globals) that reference
  objects created during the window, named where they are reachable by name
  (`module.GLOBAL`, `Class.attribute`), ranked by the bytes the new objects retain, with the
  types they retain (a figure registry holding figure managers retains the Figures);
- with tracemalloc tracing during the window: where the held objects were allocated (the first
  frame outside the standard library and installed packages, `file:line`) and the allocation sites
  of the memory still held, by bytes.

All of it runs only when growth is suspected: a census walks every object (about 1.6 µs each) and
tracemalloc slows every allocation while it traces (see benchmarks/bench_memory.py); the monitor
runs censuses in a forked child (`pyfast.memory.search`).
"""

from __future__ import annotations

import collections
import gc
import itertools
import os
import sys
import sysconfig
import time
import tracemalloc
import types
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

TOP = 10
_HOLDERS_EXAMINED = 20   # holders whose retained objects are walked
_HOLDERS_REPORTED = 5
_SITE_SAMPLES = 50       # held objects whose allocation traceback is looked up, per holder
_THIS_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def type_name(kind: type) -> str:
    module = getattr(kind, "__module__", None) or "?"
    qualname = getattr(kind, "__qualname__", None) or kind.__name__
    return qualname if module == "builtins" else f"{module}.{qualname}"


def _non_holder_types() -> Tuple[type, ...]:
    """Types whose instances cannot gain a reference after creation (or only by rare surgery):
    an old one cannot hold a new object, so the search for holders skips them."""
    return (tuple, frozenset, str, bytes, int, float, complex, type(None), type, types.CodeType,
            types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.ModuleType,
            types.MethodDescriptorType, types.WrapperDescriptorType, types.GetSetDescriptorType,
            types.MemberDescriptorType, property, staticmethod, classmethod, weakref.ref)


_NON_HOLDERS = _non_holder_types()


def _member(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """values[i] in sorted_set, for uint64 id arrays."""
    if not sorted_set.size:
        return np.zeros(values.shape, dtype=bool)
    where = np.minimum(np.searchsorted(sorted_set, values), sorted_set.size - 1)
    return sorted_set[where] == values


def live_objects(exclude: Iterable[int] = (), collect: bool = True) -> List[object]:
    """Every live object: those the garbage collector tracks, plus the untracked objects they refer
    to (arrays, strings, numbers, tuples of those), after a full collection. Objects in `exclude`
    (ids) are neither returned nor walked into.

    The walk is done on arrays of ids (numpy) rather than Python sets: a million references cost
    a few tenths of a second instead of seconds. No comprehension here: one would turn the locals
    it reads into cell objects, which would be counted as live objects themselves.
    collect: run a full collection first (not in a forked census: see pyfast.memory.fork).
    """
    if collect:
        gc.collect()
    everything = gc.get_objects()
    excluded = np.sort(np.append(np.fromiter(exclude, dtype=np.uint64), np.uint64(id(everything))))
    ids = _ids(everything)
    keep = ~_member(ids, excluded)
    objects = list(itertools.compress(everything, keep.tolist()))
    everything.clear()
    known = np.sort(np.concatenate([ids[keep], excluded]))
    del ids, keep
    frontier: List[object] = objects
    untracked: List[object] = []
    while frontier:
        refs = gc.get_referents(*frontier)
        if not refs:
            break
        unique, first = np.unique(_ids(refs), return_index=True)
        fresh = ~_member(unique, known)
        if not fresh.any():
            break
        found = list(map(refs.__getitem__, first[fresh].tolist()))
        refs.clear()
        known = np.sort(np.concatenate([known, unique[fresh]]))
        untracked.extend(found)
        frontier = found
    objects.extend(untracked)
    return objects


class _Table:
    """Per-object type codes and sizes of a list of objects, computed with C-level maps and numpy.

    size: `sys.getsizeof`, plus for tensors the bytes of their storage, once per storage; CUDA
    storages are counted in `tensor_bytes` (by device type), not in the host sizes.
    """

    def __init__(self, objects: Sequence[object]):
        n = len(objects)
        kinds = list(map(type, objects))
        unique = list(set(kinds))
        code_of = {kind: code for code, kind in enumerate(unique)}
        self.codes = np.fromiter(map(code_of.__getitem__, kinds), dtype=np.int64, count=n)
        del kinds
        try:
            self.sizes = np.fromiter(map(sys.getsizeof, objects), dtype=np.int64, count=n)
        except Exception:  # a broken __sizeof__ somewhere: measure one by one
            self.sizes = np.fromiter(map(_safe_sizeof, objects), dtype=np.int64, count=n)
        self.types = unique
        self.names = [type_name(kind) for kind in unique]
        self.counted = np.ones(len(unique), dtype=bool)  # per type code
        self.tensor_bytes: Counter = Counter()
        torch = sys.modules.get("torch")
        if torch is not None:
            base = torch._C.TensorBase
            tensor_codes = [code for code, kind in enumerate(unique) if issubclass(kind, base)]
            # Asking a tensor for its storage creates the storage's Python object, which then lives
            # as long as the storage: storage objects are not counted (their bytes are, with the
            # tensors), or every census would find the previous one's as new objects.
            for code, kind in enumerate(unique):
                if torch.UntypedStorage in getattr(kind, "__mro__", ()):  # not issubclass: no ABC caches
                    self.counted[code] = False
                    self.sizes[self.codes == code] = 0
            if tensor_codes:
                storages: set = set()
                for position in np.flatnonzero(np.isin(self.codes, tensor_codes)):
                    self.sizes[position] += self._storage_bytes(objects[position], storages)

    def _storage_bytes(self, tensor, seen: set) -> int:
        try:
            storage = tensor.untyped_storage()
            key = (str(storage.device), storage.data_ptr())
        except Exception:  # sparse, meta and fake tensors have no plain storage
            return 0
        if not key[1] or key in seen:
            return 0
        seen.add(key)
        nbytes = storage.nbytes()
        self.tensor_bytes[storage.device.type] += nbytes
        return nbytes if storage.device.type == "cpu" else 0

    def by_name(self) -> Tuple[Dict[str, int], Dict[str, int]]:
        k = len(self.types)
        counts = np.bincount(self.codes, minlength=k)
        sizes = np.bincount(self.codes, weights=self.sizes.astype(np.float64), minlength=k)
        count_by, size_by = Counter(), Counter()
        for code, name in enumerate(self.names):  # distinct types may share a name
            if not self.counted[code]:
                continue
            count_by[name] += int(counts[code])
            size_by[name] += int(sizes[code])
        return dict(count_by), dict(size_by)


def _safe_sizeof(obj) -> int:
    try:
        return sys.getsizeof(obj)
    except Exception:
        return 0


@dataclass
class Census:
    step: int
    counts: Dict[str, int]
    sizes: Dict[str, int]
    tensor_bytes: Dict[str, int]
    ids: np.ndarray = field(repr=False)  # sorted ids of the objects counted
    container_ids: np.ndarray = field(repr=False)  # sorted ids of the lists, dicts, sets and deques
    container_lens: np.ndarray = field(repr=False)  # their lengths
    seconds: float = 0.0
    objects: int = 0

    def own_ids(self) -> List[int]:
        return [id(self), id(self.counts), id(self.sizes), id(self.tensor_bytes), id(self.ids),
                id(self.container_ids), id(self.container_lens)]

    def __setstate__(self, state: dict) -> None:
        # Unpickled arrays live in a chain of views over the pickle's bytearray, objects a later
        # census would count: own copies instead.
        self.__dict__.update(state)
        for name in ("ids", "container_ids", "container_lens"):
            setattr(self, name, np.array(getattr(self, name), copy=True))

    def length_of(self, obj) -> Optional[int]:
        """The length `obj` (a container) had at this census, if it was one then."""
        key = np.uint64(id(obj))
        where = int(np.searchsorted(self.container_ids, key))
        if where < self.container_ids.size and self.container_ids[where] == key:
            return int(self.container_lens[where])
        return None


_CONTAINERS = (list, dict, set, collections.deque)


def _ids(objects: Sequence[object]) -> np.ndarray:
    return np.fromiter(map(id, objects), dtype=np.uint64, count=len(objects))


def _container_lengths(objects: Sequence[object], table: "_Table") -> Tuple[np.ndarray, np.ndarray]:
    """(sorted ids, lengths) of the builtin containers: a holder's growth in entries is exact,
    where telling new objects by id is not (a freed id can come back)."""
    is_container = np.array([issubclass(kind, _CONTAINERS) for kind in table.types], dtype=bool)
    containers = list(map(objects.__getitem__, np.flatnonzero(is_container[table.codes]).tolist()))
    ids = _ids(containers)
    lens = np.fromiter(map(len, containers), dtype=np.int64, count=len(containers))
    containers.clear()
    order = np.argsort(ids)
    return ids[order], lens[order]


def take_census(step: int, exclude: Iterable[int] = (), collect: bool = True) -> Census:
    """Counts and sizes of every live object by type, and their ids (to tell new objects later)."""
    start = time.perf_counter()
    objects = live_objects(exclude, collect)
    table = _Table(objects)
    counts, sizes = table.by_name()
    ids = np.sort(_ids(objects))
    container_ids, container_lens = _container_lengths(objects, table)
    total = len(objects)
    objects.clear()
    return Census(step, counts, sizes, dict(table.tensor_bytes), ids, container_ids, container_lens,
                  time.perf_counter() - start, total)


# ---------------------------------------------------------------- allocation sites

def _library_roots() -> Tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths.get(key) for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    return tuple(os.path.abspath(p) + os.sep for p in roots if p)


_LIBRARY_ROOTS = _library_roots()
_PYFAST_ROOT = os.path.dirname(_THIS_PACKAGE) + os.sep


def _is_user_frame(filename: str) -> bool:
    if filename.startswith("<"):
        return False
    path = os.path.abspath(filename)
    if path.startswith(_THIS_PACKAGE + os.sep):
        return False
    if path.startswith(_PYFAST_ROOT):
        return True  # pyfast's own training code counts as the user's, even when installed
    return not path.startswith(_LIBRARY_ROOTS)


def _is_own_frame(filename: str) -> bool:
    return filename.startswith(_THIS_PACKAGE + os.sep) or filename == tracemalloc.__file__


def _short(filename: str) -> str:
    try:
        relative = os.path.relpath(filename)
    except ValueError:
        return filename
    return filename if relative.startswith(".." + os.sep + "..") else relative


def user_site(traceback: Optional[tracemalloc.Traceback]) -> Optional[str]:
    """`file:line` of the innermost frame outside the standard library and installed packages
    (the innermost frame when there is none)."""
    if not traceback:
        return None
    frames = list(traceback)[::-1]  # tracemalloc lists the oldest call first
    for frame in frames:
        if _is_user_frame(frame.filename):
            return f"{_short(frame.filename)}:{frame.lineno}"
    return f"{_short(frames[0].filename)}:{frames[0].lineno}"


def allocation_sites(snapshot: tracemalloc.Snapshot, baseline: Optional[tracemalloc.Snapshot] = None,
                     top: int = TOP) -> List[dict]:
    """Memory allocated in the traced window and still held, by user allocation site and bytes.

    baseline: a snapshot from the window's start, when tracing began before it (the differences
    count then); without one, everything traced is from the window.
    """
    sizes: Counter = Counter()
    blocks: Counter = Counter()
    if baseline is None:
        stats = [(s.traceback, s.size, s.count) for s in snapshot.statistics("traceback")]
    else:
        stats = [(s.traceback, s.size_diff, s.count_diff) for s in snapshot.compare_to(baseline, "traceback")]
    for traceback, size, count in stats:
        if any(_is_own_frame(frame.filename) for frame in traceback):
            continue  # the monitor's own allocations
        site = user_site(traceback)
        sizes[site] += size
        blocks[site] += count
    return [{"site": site, "bytes": int(size), "blocks": int(blocks[site])}
            for site, size in sizes.most_common(top) if size > 0]


# ---------------------------------------------------------------- naming holders

def _module_dicts() -> Dict[int, str]:
    out = {}
    for name, module in list(sys.modules.items()):
        namespace = getattr(module, "__dict__", None)
        if isinstance(namespace, dict):
            out[id(namespace)] = name
    return out


def _key_of(container, target) -> Optional[str]:
    if isinstance(container, dict):
        for key, value in container.items():
            if value is target:
                return str(key)
    return None


def _referrers(obj) -> List[object]:
    """gc.get_referrers without the frames of this module. The frame asking is itself a referrer
    (its locals hold `obj`); a list holding that frame is a cycle that would keep the caller's
    locals, the whole census included, alive until the next collection."""
    found = gc.get_referrers(obj)
    try:
        return [r for r in found if not (isinstance(r, types.FrameType) and _is_own_frame(r.f_code.co_filename))]
    finally:
        found.clear()


def _owner_of_namespace(namespace: dict, ignore: set) -> Optional[str]:
    """The class or instance whose __dict__ is `namespace`."""
    for referrer in _referrers(namespace):
        if id(referrer) in ignore:
            continue
        if isinstance(referrer, type) and any(ref is namespace for ref in gc.get_referents(referrer)):
            return type_name(referrer)
        if getattr(referrer, "__dict__", None) is namespace:
            return type_name(type(referrer))
    return None


def _attribute_of(obj, target) -> Optional[str]:
    try:
        namespace = vars(obj)
    except TypeError:
        return None
    return _key_of(namespace, target)


def holder_name(holder, ignore: set) -> str:
    """A name for the object that holds new objects: `module.NAME`, `Class.attr`, or its type."""
    modules = _module_dicts()
    for referrer in _referrers(holder):
        if id(referrer) in ignore:
            continue
        if isinstance(referrer, dict):
            key = _key_of(referrer, holder)
            if key is None:
                continue
            if id(referrer) in modules:
                return f"{modules[id(referrer)]}.{key}"
            owner = _owner_of_namespace(referrer, ignore | {id(referrer)})
            if owner is not None:
                return f"{owner}.{key}"
        elif not isinstance(referrer, (list, tuple, set, frozenset, types.FrameType)):
            attribute = _attribute_of(referrer, holder)
            if attribute is not None:
                return f"{type_name(type(referrer))}.{attribute}"
    return f"a {type_name(type(holder))}"


# ---------------------------------------------------------------- the comparison

def _top(deltas: Dict[str, Tuple[int, int, int]], key: int, top: int) -> List[dict]:
    ranked = sorted(((name, v) for name, v in deltas.items() if v[key] > 0), key=lambda item: (-item[1][key], item[0]))
    return [{"type": name, "count": v[2], "count_delta": v[0], "bytes_delta": v[1]} for name, v in ranked[:top]]


def _retained(roots: Sequence[int], new_objects: Sequence[object], new_index: Dict[int, int],
              sizes: np.ndarray, names: Sequence[str], limit: int = 200_000):
    """Objects created in the window reachable from `roots` (indices into new_objects) through
    objects created in the window: their count, bytes, and types in order of discovery (breadth
    first: what the holder holds directly comes first)."""
    seen = set(roots)
    order = list(roots)
    depth_of: Dict[str, int] = {}
    for i in roots:
        depth_of.setdefault(names[i], 0)
    frontier = list(roots)
    depth = 0
    while frontier and len(order) < limit:
        depth += 1
        found = []
        for ref in gc.get_referents(*(new_objects[i] for i in frontier)):
            index = new_index.get(id(ref))
            if index is not None and index not in seen:
                seen.add(index)
                found.append(index)
                depth_of.setdefault(names[index], depth)
        order.extend(found)
        frontier = found
    kinds = _tally(names[i] for i in order)
    ranked = sorted(kinds.items(), key=lambda item: (depth_of[item[0]], -item[1], item[0]))
    return len(order), int(sizes[order].sum()), [{"type": name, "count": count} for name, count in ranked]


def _find_holders(objects, table: _Table, is_new: np.ndarray, new_index: Dict[int, int], ignore: set):
    """Old objects that reference new ones: holder id -> [holder, indices of its new referents]."""
    new_ids = new_index.keys()
    capable = np.array([not issubclass(kind, _NON_HOLDERS) for kind in table.types], dtype=bool)
    holders: Dict[int, list] = {}
    for position in np.flatnonzero(capable[table.codes] & ~is_new):
        obj = objects[position]
        refs = gc.get_referents(obj)
        if new_ids.isdisjoint(map(id, refs)) or id(obj) in ignore:
            continue
        holders[id(obj)] = [obj, [new_index[id(ref)] for ref in refs if id(ref) in new_index]]
    return holders


def find_growers(before: Census, step: int, *, trigger: str, exclude: Iterable[int] = (),
                 sites: Optional[List[dict]] = None, top: int = TOP, collect: bool = True) -> dict:
    """Compares the live objects now with the census `before`; returns a JSON-ready report.

    exclude: ids of objects that are the monitor's own bookkeeping (never counted, never holders).
    sites: the window's allocation sites (`allocation_sites`), computed before this census: a
    census under tracemalloc runs ten times slower, and the snapshot's own objects would be counted.
    Where tracemalloc is still tracing (the caller's own tracing), the allocation tracebacks of
    held objects are looked up too.
    """
    # No comprehension in this function (see live_objects); the work is done in _compare.
    started = time.perf_counter()
    ignore = set(exclude)
    ignore.update(before.own_ids())
    ignore.update((id(ignore), id(exclude)))
    objects = live_objects(ignore, collect)
    try:
        report = _compare(before, step, trigger, objects, ignore, top)
    finally:
        objects.clear()  # the list holds every object: drop it before anything else can keep it
    report["sites"] = list(sites or [])
    report["tracemalloc"] = sites is not None
    report["census_seconds"] = before.seconds + (time.perf_counter() - started)
    return report


def _compare(before: Census, step: int, trigger: str, objects: List[object], ignore: set, top: int) -> dict:
    table = _Table(objects)
    counts, sizes = table.by_name()
    ids = _ids(objects)
    is_new = ~_member(ids, before.ids) & table.counted[table.codes]
    ignore.add(id(objects))

    deltas = {name: (counts.get(name, 0) - before.counts.get(name, 0),
                     sizes.get(name, 0) - before.sizes.get(name, 0), counts.get(name, 0))
              for name in set(counts) | set(before.counts)}
    new_positions = np.flatnonzero(is_new)
    new_objects = list(map(objects.__getitem__, new_positions.tolist()))
    new_sizes = table.sizes[new_positions]
    new_names = [table.names[c] for c in table.codes[new_positions]]
    new_index = {id(obj): k for k, obj in enumerate(new_objects)}
    ignore.update((id(new_objects), id(new_index), id(new_names)))
    try:
        held_by = _held_by(objects, table, is_new, new_objects, new_index, new_sizes, new_names, ignore, before)
        return {
            "trigger": trigger,
            "steps": [int(before.step), int(step)],
            "objects": int(len(ids)),
            "new_objects": int(len(new_objects)),
            "new_bytes": int(new_sizes.sum()),
            "by_count": _top(deltas, 0, top),
            "by_bytes": _top(deltas, 1, top),
            "tensor_bytes_delta": {device: int(table.tensor_bytes.get(device, 0) - before.tensor_bytes.get(device, 0))
                                   for device in sorted(set(table.tensor_bytes) | set(before.tensor_bytes))},
            "held_by": held_by,
        }
    finally:
        new_objects.clear()
        new_index.clear()


def _held_by(objects, table, is_new, new_objects, new_index, new_sizes, new_names, ignore, before) -> List[dict]:
    """The holders of new objects, ranked by the bytes of new objects they retain."""
    holders = _find_holders(objects, table, is_new, new_index, ignore)
    ranked = sorted(holders.values(), key=lambda entry: -int(new_sizes[entry[1]].sum()))[:_HOLDERS_EXAMINED]
    holders.clear()
    examined = []
    for holder, children in ranked:
        count, nbytes, kinds = _retained(children, new_objects, new_index, new_sizes, new_names)
        examined.append((nbytes, count, holder, children, kinds))
    ranked.clear()
    examined.sort(key=lambda item: (-item[0], -item[1]))
    if examined:  # holders of a hundredth of the top one's bytes are noise (a lock, a cache entry)
        floor = examined[0][0] / 100
        del examined[1 + sum(1 for item in examined[1:] if item[0] >= floor):]
    own = ignore | {id(examined)}
    held_by = []
    try:
        for nbytes, count, holder, children, kinds in examined[:_HOLDERS_REPORTED]:
            entry = {
                "holder": holder_name(holder, own),
                "holder_type": type_name(type(holder)),
                "holder_len": _safe_len(holder),
                "len_delta": None,
                "new": dict(sorted(_tally(new_names[i] for i in children).items(), key=lambda kv: -kv[1])[:TOP]),
                "retained_objects": count,
                "retained_bytes": nbytes,
                "retains": kinds[:TOP],
                "allocated_at": None,
            }
            if isinstance(holder, _CONTAINERS) and entry["holder_len"] is not None:
                then = before.length_of(holder)
                if then is not None:
                    entry["len_delta"] = entry["holder_len"] - then
            if tracemalloc.is_tracing():
                # Python 3.11 finds no traceback for objects with a pre-header (instances, tensors);
                # 3.12 does. The window's allocation sites do not depend on it.
                sites = _tally(user_site(tracemalloc.get_object_traceback(new_objects[i]))
                               for i in children[:_SITE_SAMPLES])
                sites.pop(None, None)
                if sites:
                    entry["allocated_at"] = max(sites, key=sites.get)
            held_by.append(entry)
    finally:
        examined.clear()
    return held_by


def _tally(names: Iterable) -> Dict[object, int]:
    # Not collections.Counter(iterable): its isinstance check against an abstract class adds a
    # generator type to abc's caches, objects a later census would find.
    counts: Dict[object, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return counts


def _safe_len(obj) -> Optional[int]:
    if not hasattr(type(obj), "__len__"):
        return None
    try:
        return len(obj)
    except Exception:
        return None
