"""Whoever can write the node's personalised folder, and a confused user, against `clients.personal_store` and
`fedprop personalise`: every crafted file is refused with a PersonalisedModelError naming it (never a traceback,
never an allocation or a tree walk beyond the file's own size); --out never touches an unrelated folder; a failed
write leaves the previous model whole."""
from __future__ import annotations

import hashlib
import io
import json
import stat
import time
import zipfile

import numpy as np
import pytest

from clients.personal_store import JSON_NAME, NPZ_NAME, PersonalisedModelError, check_out_dir, load, save
from clients.personalize import HeadChoice
from federation.errors import ConfigError
from tests.scoring.test_personalised import HEADS, MODEL, _cli, _data, _model, _rewrite

NAMES = tuple(f"f{i}" for i in range(6))
OK = dict(global_sha256="a" * 64, contract_hash="h", feature_names=NAMES, heads=HEADS)
CHOICES = {  # every stored kind: trees (blend, stack), logreg (local), fine-tuned weights
    "trees_logreg": {"churn": HeadChoice("blend", alpha=0.5, local_kind="hist_gbm"),
                     "propensity": HeadChoice("local", alpha=0.0, local_kind="logreg")},
    "stack_tuned": {"churn": HeadChoice("stack", local_kind="hist_gbm"),
                    "propensity": HeadChoice("fine_tune", epochs=2)},
}


@pytest.fixture(scope="module")
def models():
    X, Y = _data()
    return {k: _model(X, Y, c) for k, c in CHOICES.items()}


def _save(pm, d):
    save(pm, d, global_sha256="a" * 64, key_fingerprint="k", contract_name="c", contract_hash="h",
         feature_names=NAMES, customers=500, seed=0)
    return d


def _refused(d, pm, match):
    with pytest.raises(PersonalisedModelError, match=match) as exc:
        load(d, pm.global_model, **OK)
    assert str(d) in str(exc.value)  # names the folder or the file
    return str(exc.value)


def _edit_json(d, edit):
    meta = json.loads((d / JSON_NAME).read_text())
    edit(meta)
    (d / JSON_NAME).write_text(json.dumps(meta))


def _set(*path, value=KeyError):
    def edit(meta):
        for p in path[:-1]:
            meta = meta[p]
        if value is KeyError:
            del meta[path[-1]]
        else:
            meta[path[-1]] = value
    return edit


# ------------------------------------------------------------------------------ crafted personalised.json
@pytest.mark.parametrize("kind,edit,match", [
    ("trees_logreg", _set("contract", value="h"), "another data contract"),
    ("trees_logreg", _set("feature_names", value=5), "features or heads differ"),
    ("trees_logreg", _set("heads", value=5), "features or heads differ"),
    ("trees_logreg", _set("choices"), "no per-head choices"),
    ("trees_logreg", _set("choices", value=[]), "no per-head choices"),
    ("trees_logreg", _set("choices", "churn", "choice", "alpha", value="0.5"), "'alpha' is str"),
    ("trees_logreg", _set("choices", "churn", "choice", "alpha", value=[1]), "'alpha' is list"),
    ("trees_logreg", _set("choices", "churn", "choice", "alpha", value=7), "alpha outside"),
    ("trees_logreg", _set("choices", "churn", "choice", "alpha", value=10 ** 400), "not a finite number"),
    ("trees_logreg", _set("choices", "churn", "choice", "local_kind", value={}), "'local_kind' is dict"),
    ("trees_logreg", _set("choices", "churn", "choice", "validation_auc", value="x"), "'validation_auc' is str"),
    ("trees_logreg", _set("choices", "churn", "choice", "ece", value="x"), "'ece' is str"),  # score formats it
    ("trees_logreg", _set("choices", "churn", "choice", "platt_a", value=float("nan")), "'platt_a'"),
    ("stack_tuned", _set("choices", "propensity", "choice", "epochs", value="2"), "'epochs' is not a count"),
    ("trees_logreg", _set("choices", "churn", "local", value="x"), "no local model description"),
    ("trees_logreg", _set("choices", "churn", "local", "baseline"), "baseline is NoneType"),
    ("trees_logreg", _set("choices", "churn", "local", "baseline", value=[1]), "baseline is list"),
    ("trees_logreg", _set("choices", "propensity", "local", "intercept"), "intercept is NoneType"),
    ("trees_logreg", _set("choices", "propensity", "local", "intercept", value="nan"), "intercept is str"),
    ("trees_logreg", _set("choices", "propensity", "local", "kind"), "no model kind"),
    ("trees_logreg", _set("choices", "propensity", "local", value={"type": "constant", "class": "x"}), "0 or 1"),
    ("trees_logreg", _set("choices", "propensity", "local", value={"type": "constant"}), "0 or 1"),
    ("trees_logreg", _set("choices", "propensity", "local", value={"type": "constant", "class": 5}), "0 or 1"),
])
def test_crafted_json_is_refused_not_a_traceback(models, tmp_path, kind, edit, match):
    pm = models[kind]
    d = _save(pm, tmp_path / "p")
    _edit_json(d, edit)
    _refused(d, pm, match)


def test_json_nested_past_the_parser_stack_is_refused(models, tmp_path):
    pm = models["trees_logreg"]
    d = _save(pm, tmp_path / "p")
    (d / JSON_NAME).write_text("[" * 200_000 + "]" * 200_000)  # RecursionError inside json.loads
    _refused(d, pm, "unreadable")


def test_hash_read_from_the_file_is_never_echoed_raw(models, tmp_path):
    pm = models["trees_logreg"]
    d = _save(pm, tmp_path / "p")
    _edit_json(d, _set("global_model_sha256", value="\x1b[2J\x1b]0;owned\x07"))  # terminal escapes
    msg = _refused(d, pm, "derived from global model")
    assert "\x1b" not in msg and "\x07" not in msg


# ------------------------------------------------------------------------------ crafted personalised.npz
def _raw(d, raw: bytes):
    """Replace the .npz with ``raw`` bytes and fix the checksum, as an attacker with write access can."""
    (d / NPZ_NAME).write_bytes(raw)
    _edit_json(d, _set("arrays_sha256", value=hashlib.sha256(raw).hexdigest()))


def _npy(a) -> bytes:
    b = io.BytesIO()
    np.save(b, a)
    return b.getvalue()


def _zip(member: str, payload: bytes, compression=zipfile.ZIP_STORED) -> bytes:
    b = io.BytesIO()
    with zipfile.ZipFile(b, "w", compression) as z:
        z.writestr(member, payload)
    return b.getvalue()


def _header(shape, descr="<f8") -> bytes:
    h = io.BytesIO()
    np.lib.format.write_array_header_1_0(h, {"descr": descr, "fortran_order": False, "shape": shape})
    return h.getvalue()


@pytest.mark.parametrize("raw", [
    b"",  # EOFError in np.load
    _npy(np.arange(3.0)),  # a bare .npy: np.load returns an array, not an archive
    b"PK\x03\x04" + b"\0" * 100,  # BadZipFile
    # a header claiming 8 TiB (np.load allocates the claimed shape before reading): compressed and stored
    _zip("churn/local/value.npy", _header((2 ** 40,)), zipfile.ZIP_DEFLATED),
    _zip("churn/local/value.npy", _header((2 ** 40,)) + b"\0" * 64),
], ids=["empty", "bare-npy", "bad-zip", "huge-shape-compressed", "huge-shape-stored"])
def test_malformed_or_oversized_archives_are_refused(models, tmp_path, raw):
    pm = models["trees_logreg"]
    d = _save(pm, tmp_path / "p")
    _raw(d, raw)
    _refused(d, pm, "unreadable")


def _put(key, make):
    def edit(a):
        a[key] = make(a[key])
    return edit


def _tuned(make):
    def edit(a):
        for k in [k for k in a if "/tuned/" in k]:
            a[k] = make(a[k])
    return edit


@pytest.mark.parametrize("kind,edit,match", [
    ("trees_logreg", _put("churn/local/feature", lambda v: v.astype(str)), "unreadable"),
    ("trees_logreg", _put("churn/local/left", lambda v: np.array(["a"] * len(v))), "unreadable"),
    ("trees_logreg", _put("churn/local/value", lambda v: v + 1j), "unreadable"),
    ("trees_logreg", _put("churn/local/value", lambda v: np.zeros(len(v), dtype=[("a", "f8")])), "unreadable"),
    ("trees_logreg", _put("churn/local/feature", lambda v: v + 0.7), "holds float64, not int64"),
    ("trees_logreg", _put("churn/local/leaf", lambda v: v.astype(str)), "unreadable"),
    ("trees_logreg", _put("churn/local/value", lambda v: np.full_like(v, np.nan)), "non-finite leaf value"),
    ("trees_logreg", _put("churn/local/threshold", lambda v: np.full_like(v, np.nan)), "NaN split threshold"),
    ("trees_logreg", _put("churn/local/roots", lambda v: v[:0]), "tree root"),
    ("trees_logreg", _put("propensity/local/coef", lambda v: np.full_like(v, np.nan)), "non-finite"),
    ("trees_logreg", _put("propensity/local/mean", lambda v: np.full_like(v, np.inf)), "non-finite"),
    ("trees_logreg", _put("propensity/local/coef", lambda v: v.astype(np.int64)), "holds int64, not float64"),
    ("stack_tuned", _tuned(lambda v: np.full_like(v, np.nan)), "not finite"),
    ("stack_tuned", _tuned(lambda v: np.full(v.shape, "x")), "unreadable"),  # torch.from_numpy TypeError before
    ("stack_tuned", _tuned(lambda v: v + 1j), "unreadable"),
    ("stack_tuned", lambda a: a.__setitem__("propensity/tuned/extra.weight", np.zeros(3, np.float32)),
     "arrays no head uses"),
    ("trees_logreg", lambda a: a.__setitem__("propensity/stacked/coef", np.zeros(3)), "arrays no head uses"),
])
def test_crafted_arrays_are_refused(models, tmp_path, kind, edit, match):
    pm = models[kind]
    d = _save(pm, tmp_path / "p")
    _rewrite(d, edit)
    _refused(d, pm, match)


def test_a_tree_walk_is_bounded_by_the_file(models, tmp_path):
    """Every root pointing at one long chain: each child after its parent (the old check), yet scoring walks
    roots x depth nodes (3000 x 3000 took ~50 s for 50 customers). Trees must be disjoint blocks, so a walk visits
    at most every node once."""
    pm = models["trees_logreg"]
    d = _save(pm, tmp_path / "p")
    m, p = 3000, "churn/local/"

    def chain(a):
        a[p + "feature"], a[p + "threshold"] = np.zeros(m, np.int64), np.full(m, 2.0)
        a[p + "left"] = a[p + "right"] = np.r_[np.arange(1, m), 0].astype(np.int64)
        a[p + "leaf"] = np.r_[np.zeros(m - 1, bool), True]
        a[p + "missing_left"], a[p + "value"], a[p + "roots"] = np.ones(m, bool), np.zeros(m), np.zeros(m, np.int64)

    _rewrite(d, chain)
    t0 = time.perf_counter()
    _refused(d, pm, "tree root")
    assert time.perf_counter() - t0 < 5


def test_well_formed_edits_still_load(models, tmp_path):
    """The checks refuse only malformed files: a saved model round-trips, an unknown extra choice field (added by a
    later version) is ignored, and one long (but single) tree is accepted and walked in time linear in its size."""
    X, _ = _data(n=50, seed=1)
    for pm in models.values():
        d = _save(pm, tmp_path / f"p{id(pm)}")
        back, _ = load(d, pm.global_model, **OK)
        np.testing.assert_allclose(back.predict_proba(X), pm.predict_proba(X), rtol=0, atol=1e-6)
    pm = models["trees_logreg"]
    d = _save(pm, tmp_path / "p")
    _edit_json(d, _set("choices", "churn", "choice", "later_field", value=1))
    load(d, pm.global_model, **OK)
    m, p = 20_000, "churn/local/"

    def chain(a):
        a[p + "feature"], a[p + "threshold"] = np.zeros(m, np.int64), np.full(m, 2.0)
        a[p + "left"] = a[p + "right"] = np.r_[np.arange(1, m), 0].astype(np.int64)
        a[p + "leaf"] = np.r_[np.zeros(m - 1, bool), True]
        a[p + "missing_left"], a[p + "value"], a[p + "roots"] = np.ones(m, bool), np.zeros(m), np.zeros(1, np.int64)

    _rewrite(d, chain)
    back, _ = load(d, pm.global_model, **OK)
    assert np.isfinite(back.predict_proba(X)).all()


# ------------------------------------------------------------------------------ writing: --out and atomicity
def test_out_that_holds_other_files_is_refused_and_left_alone(models, tmp_path):
    pm = models["trees_logreg"]
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    home.chmod(0o755)
    with pytest.raises(PersonalisedModelError, match="already holds other files"):
        _save(pm, home)  # e.g. `--out .` or `--out ~`: before, its mode became 0700 and our files landed in it
    assert stat.S_IMODE(home.stat().st_mode) == 0o755 and sorted(p.name for p in home.iterdir()) == ["notes.txt"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(PersonalisedModelError, match="not a folder"):
        check_out_dir(tmp_path / "afile")
    _save(pm, tmp_path / "p")
    _save(pm, tmp_path / "p")  # an earlier personalise's folder is replaced
    load(tmp_path / "p", pm.global_model, **OK)


def test_a_failed_write_keeps_the_previous_model_whole(models, tmp_path, monkeypatch):
    import federation.atomicio as atomicio

    first, second = models["trees_logreg"], models["stack_tuned"]
    d = _save(first, tmp_path / "p")
    real = atomicio.atomic_write_bytes

    def disk_full_on_json(path, data, **kw):
        if str(path).endswith(JSON_NAME):
            raise OSError(28, "No space left on device")
        return real(path, data, **kw)

    monkeypatch.setattr(atomicio, "atomic_write_bytes", disk_full_on_json)
    with pytest.raises(OSError):
        _save(second, d)  # the new .npz was written, its .json was not
    with pytest.raises(OSError):
        _save(second, tmp_path / "new")
    monkeypatch.setattr(atomicio, "atomic_write_bytes", real)
    back, _ = load(d, first.global_model, **OK)  # before: refused, "does not match the checksum"
    assert back.describe() == first.describe()
    assert not (tmp_path / "new").exists()


def test_personalise_refuses_a_bad_seed_or_out_before_any_work(tmp_path):
    from clients.personalise_cli import personalise_node

    args = dict(model=tmp_path / "absent.pt", data=tmp_path / "absent.csv", contract=tmp_path / "absent.yaml",
                public_key=tmp_path / "absent.pub")
    with pytest.raises(ConfigError, match="--seed"):  # before: ValueError from numpy after validation, blaming data
        personalise_node(out=tmp_path / "o", seed=-1, **args)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):  # before: FileExistsError after minutes, blaming data
        personalise_node(out=tmp_path / "afile", **args)


# ------------------------------------------------------------------------------ the commands end to end
def test_commands_refuse_cleanly(two_runs, events_csv, tmp_path, capsys):
    root, run, _ = two_runs
    key = root / "keys" / "server.pub"
    base = ("--model", run / MODEL, "--public-key", key, "--data", events_csv, "--contract",
            "contracts/synthetic_events.yaml")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    rc, _, err = _cli(capsys, "personalise", *base, "--out", mine)
    assert rc == 2 and "already holds other files" in err and not (mine / JSON_NAME).exists()
    (mine / "notes.txt").unlink()
    rc, _, err = _cli(capsys, "personalise", *base, "--out", mine)
    assert rc == 0, err
    (mine / JSON_NAME).write_text("[" * 200_000 + "]" * 200_000)
    rc, _, err = _cli(capsys, "score", *base, "--out", tmp_path / "s.csv", "--personalised", mine)
    assert rc == 1 and "REFUSED" in err and "unreadable" in err and not (tmp_path / "s.csv").exists()


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    from tests.report.runfixture import make_run

    root = tmp_path_factory.mktemp("personal_attacks")
    return root, make_run(root / "run", root / "keys", rounds=1), None
