"""The device treats a portfolio as hostile: every kind of broken file is refused with a clear error."""

import json
import os
import struct
import zipfile

import numpy as np
import pytest
from onnx_helpers import manifest_for, tiny_blobs, tiny_classifier, tiny_portfolio, write_zip

from edgeshift.core.errors import PortfolioError, UnknownNameError
from edgeshift.runtime.manifest import variant_file
from edgeshift.runtime.portfolio import Portfolio


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "pf.zip"
    blobs = tiny_portfolio(path)
    return path, blobs


def test_valid_portfolio_opens_verifies_and_starts_at_the_median(good):
    path, blobs = good
    with Portfolio.open(path) as pf:
        assert pf.names == ["w4", "w8", "w16", "w32"]
        assert pf.median_variant == "w8"
        for name, data in blobs.items():
            assert pf.inflate(name) == data
        pf.verify()
        assert all(v.deflated_bytes > 0 for v in pf.variants)
        with pytest.raises(UnknownNameError, match="w16"):
            pf.info("w5")


def broken(tmp_path, manifest=None, members=None, blobs=None):
    blobs = blobs or tiny_blobs()
    manifest = manifest if manifest is not None else manifest_for(blobs)
    members = members if members is not None else {variant_file(n): d for n, d in blobs.items()}
    path = tmp_path / "bad.zip"
    write_zip(path, manifest, members)
    return path


def refused(path, match):
    before = set(os.listdir(path.parent))
    with pytest.raises(PortfolioError, match=match):
        with Portfolio.open(path) as pf:
            pf.verify()
    assert set(os.listdir(path.parent)) == before, "nothing may be extracted to disk"


def test_random_bytes(tmp_path):
    (tmp_path / "x.zip").write_bytes(os.urandom(5000))
    refused(tmp_path / "x.zip", "corrupt or truncated ZIP")


def test_empty_file(tmp_path):
    (tmp_path / "x.zip").write_bytes(b"")
    refused(tmp_path / "x.zip", "empty")


def test_truncated(good):
    path, _ = good
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    refused(path, "corrupt or truncated")


def test_flipped_byte_inside_a_variant(good):
    path, blobs = good
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(variant_file("w32"))
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    data[start + info.compress_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    refused(path, "corrupt")


def test_tampered_variant_with_a_valid_zip_fails_its_hash(tmp_path):
    blobs = tiny_blobs()
    members = {variant_file(n): d for n, d in blobs.items()}
    evil = bytearray(blobs["w16"])
    evil[-5] ^= 1  # same length, different bytes: only the sha256 can tell
    members[variant_file("w16")] = bytes(evil)
    refused(broken(tmp_path, members=members, blobs=blobs), "fails its sha256")


def test_decompression_bomb_declared(tmp_path):
    blobs = tiny_blobs()
    members = {variant_file(n): d for n, d in blobs.items()}
    members[variant_file("w4")] = b"\0" * (50 * 1024 * 1024)  # inflates far beyond what the manifest declares
    refused(broken(tmp_path, members=members, blobs=blobs), "claims 52428800 bytes inflated")


def test_decompression_bomb_with_a_lying_header(tmp_path):
    """The ZIP directory claims the manifest's size, the data inflates to 50 MiB: reading stops at the cap."""
    blobs = tiny_blobs()
    members = {variant_file(n): d for n, d in blobs.items()}
    members[variant_file("w4")] = b"\0" * (50 * 1024 * 1024)
    path = broken(tmp_path, members=members, blobs=blobs)
    data = bytearray(path.read_bytes())
    declared = len(blobs["w4"])
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(variant_file("w4"))
    # patch the uncompressed size in both the local header and the central directory
    struct.pack_into("<I", data, info.header_offset + 22, declared)
    idx = 0
    while True:
        idx = data.find(b"PK\x01\x02", idx)
        name_len = struct.unpack_from("<H", data, idx + 28)[0]
        if data[idx + 46 : idx + 46 + name_len] == variant_file("w4").encode():
            struct.pack_into("<I", data, idx + 24, declared)
            break
        idx += 4
    path.write_bytes(bytes(data))
    refused(path, f"inflates past its declared {declared} bytes")
    # reading stops at the cap: what was allocated while refusing is far below the 50 MiB the member holds
    import tracemalloc

    with Portfolio.open(path) as pf:
        tracemalloc.start()
        with pytest.raises(PortfolioError, match="inflates past"):
            pf.inflate("w4")
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 2 * 1024 * 1024, peak


@pytest.mark.parametrize(
    "name", ["../evil.onnx", "variants/../../evil.onnx", "evil.txt", "/abs/evil.onnx", "variants/sub/evil.onnx"]
)
def test_members_outside_variants_are_refused(tmp_path, name):
    blobs = tiny_blobs()
    members = {variant_file(n): d for n, d in blobs.items()}
    members[name] = b"x"
    refused(broken(tmp_path, members=members, blobs=blobs), "unexpected member")


def test_undeclared_variant_member(tmp_path):
    blobs = tiny_blobs()
    members = {variant_file(n): d for n, d in blobs.items()}
    members["variants/extra.onnx"] = blobs["w4"]
    refused(broken(tmp_path, members=members, blobs=blobs), "not declared in the manifest")


def test_missing_manifest(tmp_path):
    path = tmp_path / "m.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("variants/a.onnx", b"x")
    refused(path, "no manifest.json")


def test_manifest_not_json(tmp_path):
    refused(broken(tmp_path, manifest=b"{not json"), "not valid JSON")


@pytest.mark.parametrize("nesting", [b"[" * 200_000 + b"]" * 200_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000])
def test_deeply_nested_manifest_is_refused_before_parsing(tmp_path, nesting):
    refused(broken(tmp_path, manifest=nesting), "nested deeper than 32 levels")


def test_brackets_inside_strings_do_not_count_as_nesting(tmp_path):
    blobs = tiny_blobs()
    manifest = manifest_for(blobs)
    manifest["architecture"] = "[[[[" * 150 + '\\\\"{' * 50  # escaped quotes too; 800 characters
    with Portfolio.open(broken(tmp_path, manifest=manifest, blobs=blobs)) as pf:
        assert pf.names == sorted(blobs, key=lambda n: len(blobs[n]))


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda m: m.update(schema_version=99), "schema_version 99 is not supported"),
        (lambda m: m["variants"].reverse(), "sorted by bytes"),
        (lambda m: m["variants"][0].update(file="variants/other.onnx"), "file must be"),
        (lambda m: m["variants"][0].update(name="../x"), "not a safe name"),
        (lambda m: m["variants"][1].update(name=m["variants"][0]["name"]), "appears twice"),
        (lambda m: m["variants"][0].update(sha256="xyz"), "sha256 must be 64"),
        (lambda m: m["input"].update(dtype="float64"), "input.dtype"),
        (lambda m: m["input"].update(shape=[None, -3, 8, 8]), "bad dimension"),
        (lambda m: m["preprocessing"].update(std=[0, 1, 1]), "std must not contain 0"),
        (lambda m: m.pop("labels"), "lacks 'labels'"),
        (lambda m: m["variants"][0].update(bytes="12"), "bytes must be int"),
        (lambda m: m["variants"][0]["accuracy"].update(top1=1.5), r"top1 must be in \[0, 1\]"),
        (lambda m: m["variants"].clear(), "no variants"),
    ],
)
def test_manifest_schema_violations(tmp_path, mutate, match):
    blobs = tiny_blobs()
    manifest = manifest_for(blobs)
    mutate(manifest)
    refused(broken(tmp_path, manifest=json.loads(json.dumps(manifest)), blobs=blobs), match)


def test_declared_variant_missing(tmp_path):
    blobs = tiny_blobs()
    members = {variant_file(n): d for n, d in blobs.items() if n != "w8"}
    refused(broken(tmp_path, members=members, blobs=blobs), "'w8' is declared but")


def test_stored_members_are_accepted_other_methods_not(tmp_path):
    blobs = tiny_blobs()
    path = tmp_path / "stored.zip"
    write_zip(path, manifest_for(blobs), {variant_file(n): d for n, d in blobs.items()}, method=zipfile.ZIP_STORED)
    with Portfolio.open(path) as pf:
        pf.verify()
    path = tmp_path / "bz.zip"
    write_zip(path, manifest_for(blobs), {variant_file(n): d for n, d in blobs.items()}, method=zipfile.ZIP_BZIP2)
    refused(path, "compression method")


@pytest.mark.parametrize("method", [zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED])
def test_pacing_sees_every_piece_and_changes_no_byte(tmp_path, method):
    rng = np.random.default_rng(0)  # 3.5 MB, half noise: several pieces either way
    noise = rng.integers(0, 256, 1_750_000, dtype=np.uint8).tobytes()
    blobs = {"big": tiny_classifier(4, payload=noise + bytes(1_750_000))}
    path = tmp_path / "big.zip"
    write_zip(path, manifest_for(blobs), {variant_file("big"): blobs["big"]}, method=method)
    seen = []
    with Portfolio.open(path) as pf:
        assert pf.inflate("big", pace=seen.append) == blobs["big"]
        pieces = len(seen)
        with pf.inflated_path("big", pace=seen.append) as p:
            with open(p, "rb") as f:
                assert f.read() == blobs["big"]
    assert pieces >= 4 and len(seen) == 2 * pieces  # the same pieces both ways, one call each
    assert all(t > 0 for t in seen)
