"""Ed25519 signing of released models: what verifies, and every way a model is refused."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import stat

import pytest

from federation.errors import FedpropError
from federation.signing import (
    SignatureError,
    SigningKeyError,
    generate_keypair,
    public_key_fingerprint,
    read_verified_bytes,
    sign_file,
    signature_path,
    verify_file,
)

MODEL = b"\x80\x04fake-model-weights" + bytes(range(256)) * 4


@pytest.fixture()
def keys(tmp_path):
    priv, pub = tmp_path / "keys" / "server.key", tmp_path / "keys" / "server.pub"
    fingerprint = generate_keypair(priv, pub)
    return priv, pub, fingerprint


@pytest.fixture()
def signed(tmp_path, keys):
    model = tmp_path / "global_model.pt"
    model.write_bytes(MODEL)
    sig = sign_file(model, keys[0])
    return model, sig


def test_round_trip(signed, keys):
    model, sig = signed
    assert sig == signature_path(model) and sig.name == "global_model.pt.sig"
    manifest = verify_file(model, keys[1])
    assert manifest["file"] == "global_model.pt" and manifest["size"] == len(MODEL)
    assert manifest["key_fingerprint"] == keys[2] == public_key_fingerprint(keys[1])
    assert read_verified_bytes(model, keys[1]) == MODEL


def test_private_key_mode_0600_and_pem_pkcs8(keys, capsys):
    priv, pub, _ = keys
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    from cryptography.hazmat.primitives import serialization as ser

    # PKCS#8 PEM, unencrypted: the file is exactly the key re-serialised in that format (no key text in the repo)
    key = ser.load_pem_private_key(priv.read_bytes(), password=None)
    assert priv.read_bytes() == key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
    pem_pub = key.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo)
    assert pub.read_bytes() == pem_pub
    out = capsys.readouterr()
    assert "PRIVATE" not in out.out + out.err
    assert not [p for p in priv.parent.iterdir() if p.name.endswith(".tmp")]


def test_generate_refuses_to_overwrite(keys):
    priv, pub, _ = keys
    before = priv.read_bytes()
    with pytest.raises(SigningKeyError, match="refusing to overwrite"):
        generate_keypair(priv, pub)
    assert priv.read_bytes() == before


def test_tampered_model_byte_is_refused(signed, keys):
    model, _ = signed
    data = bytearray(MODEL)
    data[100] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(SignatureError, match="contents changed after signing") as err:
        verify_file(model, keys[1])
    assert str(model) in str(err.value)
    with pytest.raises(SignatureError):
        read_verified_bytes(model, keys[1])


def test_appended_bytes_are_refused(signed, keys):
    model, _ = signed
    model.write_bytes(MODEL + b"\x00")
    with pytest.raises(SignatureError, match="tampered"):
        verify_file(model, keys[1])


def test_signature_by_another_key_is_refused(tmp_path, signed, keys):
    model, _ = signed
    other_priv, other_pub = tmp_path / "other.key", tmp_path / "other.pub"
    generate_keypair(other_priv, other_pub)
    sign_file(model, other_priv)  # an attacker re-signs with their own key
    with pytest.raises(SignatureError, match="does not verify") as err:
        verify_file(model, keys[1])
    assert str(model) in str(err.value)
    assert verify_file(model, other_pub)  # sanity: it is a valid signature, just not the federation's


def test_altered_manifest_is_refused(signed, keys):
    model, sig = signed
    model.write_bytes(b"malicious")
    doc = json.loads(sig.read_text())
    doc["manifest"]["sha256"] = hashlib.sha256(b"malicious").hexdigest()
    doc["manifest"]["size"] = len(b"malicious")
    sig.write_text(json.dumps(doc))
    with pytest.raises(SignatureError, match="does not verify"):
        verify_file(model, keys[1])


def test_missing_signature_is_refused(signed, keys):
    model, sig = signed
    sig.unlink()
    with pytest.raises(SignatureError, match="missing") as err:
        verify_file(model, keys[1])
    assert str(model) in str(err.value)
    assert isinstance(err.value, FedpropError)


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[]",
        json.dumps({"manifest": {}, "signature": "AAAA"}),
        "truncate-signature",
        "bad-base64",
    ],
)
def test_malformed_signature_is_refused(signed, keys, content):
    model, sig = signed
    if content == "truncate-signature":
        doc = json.loads(sig.read_text())
        doc["signature"] = base64.b64encode(base64.b64decode(doc["signature"])[:32]).decode()
        content = json.dumps(doc)
    elif content == "bad-base64":
        doc = json.loads(sig.read_text())
        doc["signature"] = "!!not base64!!"
        content = json.dumps(doc)
    sig.write_text(content)
    with pytest.raises(SignatureError, match="malformed") as err:
        verify_file(model, keys[1])
    assert str(model) in str(err.value)


def test_renamed_model_is_refused(signed, keys):
    model, sig = signed
    renamed = model.with_name("propensity_model.pt")
    model.rename(renamed)
    sig.rename(signature_path(renamed))
    with pytest.raises(SignatureError, match="named 'global_model.pt'"):
        verify_file(renamed, keys[1])


def test_missing_model_and_bad_keys(tmp_path, signed, keys):
    with pytest.raises(SignatureError, match="not found"):
        verify_file(tmp_path / "nope.pt", keys[1])
    with pytest.raises(SigningKeyError, match="not found"):
        verify_file(signed[0], tmp_path / "nope.pub")
    junk = tmp_path / "junk.pub"
    junk.write_text("hello")
    with pytest.raises(SigningKeyError, match="not a PEM public key"):
        verify_file(signed[0], junk)


def test_world_readable_private_key_is_refused(signed, keys):
    os.chmod(keys[0], 0o644)
    with pytest.raises(SigningKeyError, match="chmod 600"):
        sign_file(signed[0], keys[0])
