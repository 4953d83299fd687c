"""A partner's personalised model on its own disk, in a format that runs no code when read.

``save(model, out_dir, ...)`` writes ``personalised.json`` (what was chosen, from which global model, under which
contract) and ``personalised.npz`` (every number: scaler, coefficients, tree nodes, fine-tuned weights), both
mode 0600 in a 0700 folder, atomically. ``load(dir, global_model, ...)`` reads them back with
``numpy.load(allow_pickle=False)`` and plain JSON: no pickle, no torch.load of arbitrary objects, so a file an
attacker placed there can at worst give wrong scores, never run code. Every index and shape is checked before
use (a tree whose child points outside the tree, a coefficient vector of the wrong length: refused, naming the
file).

What it does NOT protect: the files are not signed. Whoever can write the node's disk can replace them (as they
could replace the customer data the scores are computed from); ``fedprop score`` only checks that they were
derived from the very global model it verified (its SHA-256) and the same contract. The personalised model is a
non-private function of the partner's customers: it never leaves the node and is not a DP release
(``clients.personalize``).

Supported local models: ``logreg(C=..)`` (StandardScaler + LogisticRegression), ``hist_gbm``
(HistGradientBoostingClassifier with numeric splits: the fitted trees are exported node by node and evaluated
here exactly as scikit-learn does), ``constant``.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from federation.errors import FedpropError

FORMAT = "fedprop-personalised/1"
JSON_NAME, NPZ_NAME = "personalised.json", "personalised.npz"


class PersonalisedModelError(FedpropError):
    """The personalised model folder is missing, unreadable, or does not belong to this global model."""


# ------------------------------------------------------------------ estimators rebuilt from arrays
class ArrayLogreg:
    """StandardScaler + binary LogisticRegression from its arrays; ``predict_proba`` as scikit-learn computes it."""

    def __init__(self, mean: np.ndarray, scale: np.ndarray, coef: np.ndarray, intercept: float):
        self.mean, self.scale, self.coef, self.intercept = mean, scale, coef, float(intercept)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        from scipy.special import expit

        z = ((np.asarray(X, np.float64) - self.mean) / self.scale) @ self.coef + self.intercept
        p = expit(z)
        return np.c_[1 - p, p]


class ArrayTrees:
    """A binary HistGradientBoostingClassifier's trees: raw score = baseline + sum of leaf values, where a sample
    goes left at a node iff its feature is <= the threshold (or is NaN and missing values go left)."""

    def __init__(self, baseline: float, feature: np.ndarray, threshold: np.ndarray, missing_left: np.ndarray,
                 left: np.ndarray, right: np.ndarray, leaf: np.ndarray, value: np.ndarray, roots: np.ndarray):
        self.baseline = float(baseline)
        self.feature, self.threshold, self.missing_left = feature, threshold, missing_left
        self.left, self.right, self.leaf, self.value, self.roots = left, right, leaf, value, roots

    def raw(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, np.float64)
        rows = np.arange(len(X))
        out = np.full(len(X), self.baseline)
        for root in self.roots:  # in order: the same summation order as scikit-learn's raw prediction
            node = np.full(len(X), root, dtype=np.int64)
            while True:
                inner = ~self.leaf[node]
                if not inner.any():
                    break
                n = node[inner]
                x = X[rows[inner], self.feature[n]]
                go_left = np.where(np.isnan(x), self.missing_left[n], x <= self.threshold[n])
                node[inner] = np.where(go_left, self.left[n], self.right[n])
            out += self.value[node]
        return out

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        from scipy.special import expit

        p = expit(self.raw(X))
        return np.c_[1 - p, p]


class ArrayConstant:
    """A one-class training set's model (``LocalModel.logit`` gives +-30)."""

    def __init__(self, cls: int):
        self.classes_ = np.array([int(cls)])


# ------------------------------------------------------------------ export
def _export_local(local, prefix: str, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    est = local.estimator
    if local.kind == "constant":
        return {"kind": "constant", "type": "constant", "class": int(est.classes_[0])}
    if local.kind.startswith("logreg"):
        scaler, lr = est.named_steps["standardscaler"], est.named_steps["logisticregression"]
        if list(lr.classes_) != [0.0, 1.0] and list(lr.classes_) != [0, 1]:
            raise PersonalisedModelError(f"cannot export {local.kind}: classes {list(lr.classes_)} are not [0, 1]")
        arrays[prefix + "mean"] = np.asarray(scaler.mean_, np.float64)
        arrays[prefix + "scale"] = np.asarray(scaler.scale_, np.float64)
        arrays[prefix + "coef"] = np.asarray(lr.coef_[0], np.float64)
        return {"kind": local.kind, "type": "logreg", "intercept": float(lr.intercept_[0])}
    if local.kind == "hist_gbm":
        if getattr(est, "n_trees_per_iteration_", 1) != 1:
            raise PersonalisedModelError("cannot export hist_gbm: not a binary classifier")
        cols: dict[str, list[np.ndarray]] = {k: [] for k in ("feature", "threshold", "missing_left", "left", "right",
                                                             "leaf", "value")}
        roots, offset = [], 0
        for (pred,) in est._predictors:
            nd = pred.nodes
            if nd["is_categorical"].any():
                raise PersonalisedModelError("cannot export hist_gbm with categorical splits")
            roots.append(offset)
            cols["feature"].append(nd["feature_idx"].astype(np.int64))
            cols["threshold"].append(nd["num_threshold"].astype(np.float64))
            cols["missing_left"].append(nd["missing_go_to_left"].astype(bool))
            cols["left"].append(nd["left"].astype(np.int64) + offset)
            cols["right"].append(nd["right"].astype(np.int64) + offset)
            cols["leaf"].append(nd["is_leaf"].astype(bool))
            cols["value"].append(nd["value"].astype(np.float64))
            offset += len(nd)
        for k, v in cols.items():
            arrays[prefix + k] = np.concatenate(v) if v else np.zeros(0)
        arrays[prefix + "roots"] = np.asarray(roots, np.int64)
        return {"kind": "hist_gbm", "type": "trees", "baseline": float(np.ravel(est._baseline_prediction)[0])}
    raise PersonalisedModelError(f"cannot export a local model of kind {local.kind!r}")


def check_out_dir(out_dir: str | Path) -> Path:
    """``out_dir`` if it is a new folder or one `fedprop personalise` wrote (only its two files); anything else is
    refused before any work is done: a confused ``--out .`` or ``--out ~`` would otherwise have its mode changed
    to 0700 and a customer-level model dropped among unrelated files."""
    d = Path(out_dir)
    if not (d.exists() or d.is_symlink()):
        return d
    if not d.is_dir():
        raise PersonalisedModelError(f"--out {d}: exists and is not a folder; give --out a new folder")
    try:
        others = sorted(p.name for p in d.iterdir() if p.name not in (JSON_NAME, NPZ_NAME)
                        and not (p.name.startswith((f".{JSON_NAME}.", f".{NPZ_NAME}.")) and p.name.endswith(".tmp")))
    except OSError as exc:
        raise PersonalisedModelError(f"--out {d}: cannot be listed ({exc.strerror}); give --out a new folder") from None
    if others:
        raise PersonalisedModelError(
            f"--out {d}: already holds other files ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); "
            "give --out a new folder (or the folder of an earlier `fedprop personalise`, which is replaced)")
    return d


def save(model, out_dir: str | Path, *, global_sha256: str, key_fingerprint: str, contract_name: str,
         contract_hash: str, feature_names: tuple[str, ...], customers: int, seed: int) -> Path:
    """Write ``model`` (a ``clients.personalize.PersonalisedModel``) to ``out_dir``; return the JSON's path."""
    from federation.atomicio import atomic_write_bytes

    arrays: dict[str, np.ndarray] = {}
    heads: dict[str, Any] = {}
    for h in model.heads:
        c = model.choices[h]
        entry: dict[str, Any] = {"choice": asdict(c), "describe": model.describe()[h]}
        if c.kind in ("local", "blend"):
            entry["local"] = _export_local(model.local[h], f"{h}/local/", arrays)
        elif c.kind == "stack":
            entry["stacked"] = _export_local(model.stacked[h], f"{h}/stacked/", arrays)
        elif c.kind == "fine_tune":
            for k, v in model.tuned[h].state_dict().items():
                arrays[f"{h}/tuned/{k}"] = v.detach().cpu().numpy()
            entry["tuned"] = sorted(k for k in model.tuned[h].state_dict())
        heads[h] = entry
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    npz = buf.getvalue()
    meta = {"format": FORMAT, "heads": list(model.heads), "choices": heads,
            "global_model_sha256": global_sha256, "key_fingerprint": key_fingerprint,
            "contract": {"name": contract_name, "hash": contract_hash}, "feature_names": list(feature_names),
            "customers": int(customers), "seed": int(seed), "arrays_sha256": hashlib.sha256(npz).hexdigest(),
            "privacy": "NOT a DP release: a non-private function of this partner's customers; never send it off "
                       "the node"}
    out = check_out_dir(out_dir)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o700)
    # The pair is replaced in two renames; should the second fail, the first is undone, so the folder keeps the
    # previous model whole (or nothing) rather than a new .npz under the old .json.
    old = (out / NPZ_NAME).read_bytes() if (out / NPZ_NAME).is_file() else None
    try:
        atomic_write_bytes(out / NPZ_NAME, npz, mode=0o600)
        return atomic_write_bytes(out / JSON_NAME, (json.dumps(meta, indent=2) + "\n").encode(), mode=0o600)
    except BaseException:
        try:
            if old is None:
                (out / NPZ_NAME).unlink(missing_ok=True)
                if created:
                    out.rmdir()
            else:
                atomic_write_bytes(out / NPZ_NAME, old, mode=0o600)
        except OSError:
            pass
        raise


# ------------------------------------------------------------------ import
# Everything below reads files that whoever can write the node's disk may have crafted: every value is checked
# for type, shape and range before use, so a crafted file is refused with a PersonalisedModelError naming it,
# never a traceback, never code run, and never an allocation or a tree walk larger than the file itself.
MAX_JSON_BYTES = 16 << 20  # names and a few numbers; a bigger personalised.json is not one `personalise` wrote
_KINDS = ("global", "local", "fine_tune", "blend", "stack")


def _need(ok: bool, path: Path, what: str) -> None:
    if not ok:
        raise PersonalisedModelError(f"{path}: {what}; rerun `fedprop personalise` to rebuild it")


def _short_hex(v: Any) -> str:
    """The first digits of a hash read from the file, or a placeholder: never echo other bytes to a terminal."""
    return v[:12] if isinstance(v, str) and v and all(ch in "0123456789abcdef" for ch in v[:64]) else "(not a hash)"


def _number(v: Any, path: Path, what: str, *, nan_ok: bool = False) -> float:
    """A JSON number as a float: finite (or NaN where ``nan_ok``: a metric that could not be measured)."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    try:
        f = float(v) if ok else float("nan")
    except OverflowError:  # an integer beyond any float
        ok, f = False, float("nan")
    _need(ok and (np.isfinite(f) or (nan_ok and f != f)), path,
          f"{what} is {type(v).__name__} {f if ok else ''}".rstrip() + ", not a finite number")
    return f


def _read_json(jp: Path) -> dict:
    try:
        size = jp.stat().st_size
    except OSError as exc:
        raise PersonalisedModelError(f"{jp}: unreadable ({exc.strerror})") from None
    _need(size <= MAX_JSON_BYTES, jp, f"{size} bytes, far larger than any personalised model's description")
    try:
        meta = json.loads(jp.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser's stack
        raise PersonalisedModelError(f"{jp}: unreadable ({type(exc).__name__}: {str(exc)[:200]}); rerun "
                                     "`fedprop personalise` to rebuild it") from None
    _need(isinstance(meta, dict) and meta.get("format") == FORMAT, jp, f"not a {FORMAT} file")
    return meta


def _read_npz(raw: bytes, path: Path) -> dict[str, np.ndarray]:
    """The arrays of an uncompressed .npz (what ``np.savez`` writes) without trusting its headers: members must be
    stored, not compressed (no zip bomb); dtypes plain numbers or booleans (no pickle, no object or structured
    arrays); each header's shape must account for exactly the bytes that follow it, so nothing larger than the
    file is ever allocated (``np.load`` would allocate whatever shape a header claims before reading)."""
    import math
    import zipfile

    from numpy.lib import format as npformat

    def bad(what: str) -> PersonalisedModelError:
        return PersonalisedModelError(f"{path}: unreadable ({what}); rerun `fedprop personalise` to rebuild it")

    if raw[:4] != b"PK\x03\x04":
        raise bad("not an .npz archive")
    out: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            for info in z.infolist():
                name = info.filename
                if not name.endswith(".npy") or name[:-4] in out:
                    raise bad(f"member {name[:80]!r} is not one array of its own")
                if info.compress_type != zipfile.ZIP_STORED:
                    raise bad(f"member {name[:80]!r} is compressed; `fedprop personalise` writes stored arrays")
                data = z.read(info)
                fp = io.BytesIO(data)
                version = npformat.read_magic(fp)
                if version not in ((1, 0), (2, 0)):
                    raise bad(f"member {name[:80]!r}: .npy format version {version}")
                read_header = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
                shape, fortran, dtype = read_header(fp)
                if dtype.kind not in "biuf" or dtype.fields is not None or dtype.subdtype is not None:
                    raise bad(f"member {name[:80]!r} holds {dtype.str!r} values, not plain numbers (pickled or "
                              "structured data are never read)")
                count = math.prod(shape)
                if count * dtype.itemsize != len(data) - fp.tell():
                    raise bad(f"member {name[:80]!r}: its header claims shape {shape} but {len(data) - fp.tell()} "
                              "bytes follow")
                a = np.frombuffer(data, dtype=dtype, count=count, offset=fp.tell())
                a = a.reshape(shape, order="F" if fortran else "C")
                # booleans as 0/1 (a byte 2 would be True yet ~2 also True); native byte order; a private copy
                out[name[:-4]] = (a.view(np.uint8) != 0) if dtype.kind == "b" else a.astype(dtype.newbyteorder("="))
    except PersonalisedModelError:
        raise
    except (ValueError, EOFError, OSError, zipfile.BadZipFile, NotImplementedError, RuntimeError, OverflowError,
            TypeError, KeyError) as exc:
        raise bad(f"{type(exc).__name__}: {str(exc)[:200]}") from None
    return out


def _take(arrays: dict, used: set, key: str, dtype, path: Path, *, shape: tuple | None = None) -> np.ndarray:
    """``arrays[key]``, of exactly ``dtype`` and ``shape`` (or any vector); marks it used."""
    v = arrays.get(key)
    _need(v is not None, path, f"array {key!r} is missing")
    _need(v.dtype == np.dtype(dtype), path, f"array {key!r} holds {v.dtype}, not {np.dtype(dtype)}")
    _need(v.shape == shape if shape is not None else v.ndim == 1, path,
          f"array {key!r} has shape {v.shape}, not {shape if shape is not None else 'a vector'}")
    used.add(key)
    return v


def _import_local(spec: Any, prefix: str, arrays: dict, used: set, n_features: int, path: Path, jp: Path):
    from clients.personalize import LocalModel

    _need(isinstance(spec, dict), jp, f"{prefix}: no local model description")
    t = spec.get("type")
    if t == "constant":
        _need(spec.get("class") in (0, 1) and not isinstance(spec.get("class"), bool), jp,
              f"{prefix}: a constant model's class must be 0 or 1")
        return LocalModel("constant", ArrayConstant(int(spec["class"])))
    if t == "logreg":
        _need(isinstance(spec.get("kind"), str), jp, f"{prefix}: no model kind")
        intercept = _number(spec.get("intercept"), jp, f"{prefix}intercept")
        a = {k: _take(arrays, used, prefix + k, np.float64, path, shape=(n_features,))
             for k in ("mean", "scale", "coef")}
        _need(all(bool(np.all(np.isfinite(v))) for v in a.values()), path, f"{prefix}: non-finite mean, scale or coef")
        _need(bool(np.all(a["scale"] != 0)), path, f"{prefix}: zero scale")
        return LocalModel(spec["kind"], ArrayLogreg(a["mean"], a["scale"], a["coef"], intercept))
    if t == "trees":
        baseline = _number(spec.get("baseline"), jp, f"{prefix}baseline")
        types = {"feature": np.int64, "threshold": np.float64, "missing_left": np.bool_, "left": np.int64,
                 "right": np.int64, "leaf": np.bool_, "value": np.float64, "roots": np.int64}
        a = {k: _take(arrays, used, prefix + k, dt, path) for k, dt in types.items()}
        m = len(a["feature"])
        _need(m > 0 and all(len(a[k]) == m for k in types if k != "roots"), path,
              f"{prefix}: tree arrays of unequal length")
        roots = a["roots"]
        # each tree is one block of nodes [roots[i], roots[i+1]); children strictly after their parent and inside
        # its block, so a walk ends at a leaf and all walks together visit at most every node once per sample
        _need(len(roots) > 0 and roots[0] == 0 and bool(np.all(np.diff(roots) > 0)) and roots[-1] < m, path,
              f"{prefix}: a tree root outside the node table (roots must start at 0 and increase)")
        idx = np.arange(m)
        end = np.r_[roots[1:], m][np.searchsorted(roots, idx, side="right") - 1]
        inner = ~a["leaf"]
        for k in ("left", "right"):
            ch = a[k][inner]
            _need(bool(np.all((ch > idx[inner]) & (ch < end[inner]))), path,
                  f"{prefix}: a {k} child out of range (a child must follow its parent, inside the same tree)")
        f = a["feature"][inner]
        _need(bool(np.all((f >= 0) & (f < n_features))), path, f"{prefix}: a split on a feature the model lacks")
        _need(not bool(np.isnan(a["threshold"][inner]).any()), path, f"{prefix}: a NaN split threshold")
        _need(bool(np.all(np.isfinite(a["value"]))), path, f"{prefix}: a non-finite leaf value")
        return LocalModel("hist_gbm", ArrayTrees(baseline, a["feature"], a["threshold"], a["missing_left"], a["left"],
                                                 a["right"], a["leaf"], a["value"], roots))
    raise PersonalisedModelError(f"{jp}: unknown local model type for {prefix} ({type(t).__name__}); rerun "
                                 "`fedprop personalise` to rebuild it")


def _import_choice(raw: Any, h: str, jp: Path):
    """A ``HeadChoice`` from JSON, every field of its declared type (a string alpha would fail only when scoring)."""
    import dataclasses

    from clients.personalize import HeadChoice

    _need(isinstance(raw, dict), jp, f"no choice for head {h!r}")
    kw: dict[str, Any] = {}
    for f in dataclasses.fields(HeadChoice):
        t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if f.name not in raw:
            _need(f.default is not dataclasses.MISSING, jp, f"head {h!r}: its choice has no {f.name!r}")
            continue
        v, what = raw[f.name], f"head {h!r}: choice field {f.name!r}"
        if t == "str":
            _need(isinstance(v, str), jp, f"{what} is {type(v).__name__}, not text")
        elif t == "int":
            _need(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 10**6, jp,
                  f"{what} is not a count")
        elif t == "float":  # a NaN default marks a metric (may be unmeasured); others are model parameters
            v = _number(v, jp, what, nan_ok=isinstance(f.default, float) and f.default != f.default)
        else:
            _need(False, jp, f"{what}: this version cannot check a field of type {t}")
        kw[f.name] = v
    _need(kw.get("kind") in _KINDS, jp, f"unknown choice for {h!r}")
    _need(0.0 <= kw.get("alpha", 1.0) <= 1.0, jp, f"head {h!r}: blend weight alpha outside [0, 1]")
    return HeadChoice(**kw)


def load(model_dir: str | Path, global_model, *, global_sha256: str, contract_hash: str,
         feature_names: tuple[str, ...], heads: tuple[str, ...]):
    """The personalised model saved in ``model_dir``, refused unless it was derived from the global model with
    SHA-256 ``global_sha256`` (the verified one), under ``contract_hash``, for these features and heads."""
    import torch

    from clients.personalize import PersonalisedModel

    d = Path(model_dir)
    jp, npath = d / JSON_NAME, d / NPZ_NAME
    if not jp.is_file() or not npath.is_file():
        raise PersonalisedModelError(f"{d}: no personalised model here ({JSON_NAME} and {NPZ_NAME}); create one "
                                     "with `fedprop personalise`")
    meta = _read_json(jp)
    try:
        raw = npath.read_bytes()
    except OSError as exc:
        raise PersonalisedModelError(f"{npath}: unreadable ({exc.strerror})") from None
    _need(hashlib.sha256(raw).hexdigest() == meta.get("arrays_sha256"), npath,
          "does not match the checksum in personalised.json (partly written or edited)")
    if meta.get("global_model_sha256") != global_sha256:
        raise PersonalisedModelError(
            f"{d} was derived from global model sha256 {_short_hex(meta.get('global_model_sha256'))}, not from the "
            f"verified model {global_sha256[:12]}: the federation released a new model since; rerun "
            "`fedprop personalise` with it")
    contract = meta.get("contract")
    if not isinstance(contract, dict) or contract.get("hash") != contract_hash:
        got = _short_hex(contract.get("hash")) if isinstance(contract, dict) else "(none)"
        raise PersonalisedModelError(f"{d} was built under another data contract (hash {got}); rerun "
                                     "`fedprop personalise`")
    _need(meta.get("feature_names") == list(feature_names) and meta.get("heads") == list(heads), jp,
          "features or heads differ from the global model's")
    _need(isinstance(meta.get("choices"), dict), jp, "no per-head choices")
    arrays = _read_npz(raw, npath)
    used: set[str] = set()
    n = len(feature_names)
    choices, local, tuned, stacked = {}, {}, {}, {}
    for h in heads:
        e = meta["choices"].get(h)
        _need(isinstance(e, dict), jp, f"no choice for head {h!r}")
        c = _import_choice(e.get("choice"), h, jp)
        choices[h] = c
        if c.kind in ("local", "blend"):
            local[h] = _import_local(e.get("local"), f"{h}/local/", arrays, used, n, npath, jp)
        elif c.kind == "stack":
            stacked[h] = _import_local(e.get("stacked"), f"{h}/stacked/", arrays, used, n + 1, npath, jp)
        elif c.kind == "fine_tune":
            m = copy.deepcopy(global_model)
            state = {}
            for k, w in m.state_dict().items():
                v = _take(arrays, used, f"{h}/tuned/{k}", w.detach().cpu().numpy().dtype, npath, shape=tuple(w.shape))
                _need(v.dtype.kind != "f" or bool(np.all(np.isfinite(v))), npath,
                      f"fine-tuned weights {h}/tuned/{k} are not finite")
                state[k] = torch.from_numpy(np.ascontiguousarray(v))
            m.load_state_dict(state)
            m.eval()
            tuned[h] = m
    extra = sorted(set(arrays) - used)
    _need(not extra, npath, f"arrays no head uses ({', '.join(repr(k[:60]) for k in extra[:3])}"
          f"{', ...' if len(extra) > 3 else ''}): not what `fedprop personalise` wrote for these choices")
    pm = PersonalisedModel(tuple(heads), global_model, choices, local, tuned, stacked)
    return pm, meta
