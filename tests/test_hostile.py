"""The device side against hostile input: portfolios, profiles, bench files, traces and images made to read files
outside the portfolio, exhaust memory, hang, crash or spill tracebacks and terminal escapes. Each is run through the
device CLI as a user would, in a process of its own with torch and onnx unimportable, and must end in one line on
stderr and exit 2; its whole process tree's peak memory is measured (wait4) and bounded. A file outside the
portfolio is a canary whose access time shows a read. A command still running after two minutes has hung (that
guard is all the timeout is: no test here asserts a speed)."""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from device_helpers import BLOCK_TORCH
from onnx import TensorProto, helper, numpy_helper
from onnx_helpers import CLASSES, SIZE, manifest_for, tiny_blobs, tiny_classifier, write_zip

from edgeshift.core.errors import InputFileError, PortfolioError
from edgeshift.device_profiles import cpu_profile
from edgeshift.runtime import timing_process
from edgeshift.runtime.engine import Runtime
from edgeshift.runtime.manifest import variant_file
from edgeshift.runtime.portfolio import Portfolio
from edgeshift.runtime.timing_process import Graph, TimingError, vet_graphs

HANG_GUARD_S = 120  # the bound on any one hostile case; a command still running then has hung
MAX_RSS_MB = 2048


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    peak_rss_mb: float  # the largest resident set of the command and every process it waited for

    @property
    def error_line(self) -> str:
        """The one line an expected refusal prints; fails unless stderr is exactly one 'error:' line."""
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), self.stderr
        assert "Traceback" not in self.stdout + self.stderr
        return lines[0]


def device_cli(*args: str, cwd) -> Outcome:
    """Run ``edgeshift ARGS`` without torch or onnx, as a device has it; measure its peak memory."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-c", BLOCK_TORCH, *args], stdout=out, stderr=err, cwd=cwd)
        deadline = time.monotonic() + HANG_GUARD_S
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                pytest.fail(f"edgeshift {' '.join(args)} still ran after {HANG_GUARD_S} s (hung)")
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
        out.seek(0)
        err.seek(0)
        return Outcome(
            proc.returncode,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
            usage.ru_maxrss / 1024,
        )


def refused(outcome: Outcome, *phrases: str) -> str:
    line = outcome.error_line
    assert outcome.code == 2, outcome
    for phrase in phrases:
        assert phrase in line, line
    assert outcome.peak_rss_mb < MAX_RSS_MB, outcome.peak_rss_mb
    print(f"peak RSS {outcome.peak_rss_mb:6.0f} MB  {line[:110]}")  # shown with -s: the figures for a report
    return line


def model(nodes, initializers=(), *, opset: int = 17, inputs=None, output_shape=None) -> onnx.ModelProto:
    """A graph taking the manifest's input [N, 3, 8, 8] float32 and giving 'logits'."""
    graph = helper.make_graph(
        nodes,
        "hostile",
        inputs or [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, output_shape)],
        list(initializers),
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def head(features: str = "input") -> list:
    """Nodes that turn ``features`` into [N, 4] logits, so a hostile part can sit in front of a working model."""
    return [
        helper.make_node("GlobalAveragePool", [features], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], transB=1),
    ]


HEAD_WEIGHTS = [
    numpy_helper.from_array(np.ones((CLASSES, 3), np.float32), "fw"),
    numpy_helper.from_array(np.zeros(CLASSES, np.float32), "fb"),
]


def portfolio_of(tmp_path, variants: dict[str, bytes], mutate=None, name="evil.zip"):
    """A well-formed portfolio holding ``variants`` (hashes right); ``mutate`` edits the manifest first."""
    manifest = manifest_for(variants)
    if mutate:
        mutate(manifest)
    path = tmp_path / name
    write_zip(path, manifest, {variant_file(n): d for n, d in variants.items()})
    return path


class Canary:
    """A file outside the portfolio that would make a valid weight, and a record of whether anything read it: its
    access time set an hour before its modification time, which a read moves forward (the kernel's ``relatime``,
    the default mount option; shown on this filesystem before the canary is used, else the test is skipped)."""

    def __init__(self, folder):
        self.path = folder / "canary"
        self.path.write_bytes(np.ones((CLASSES, 3), np.float32).tobytes())
        self._age()
        self.path.read_bytes()
        if not self.read():
            pytest.skip("this filesystem does not record reads (noatime): a canary cannot tell")
        self._age()

    def _age(self) -> None:
        st = os.stat(self.path)
        os.utime(self.path, (st.st_mtime - 3600, st.st_mtime))

    def read(self) -> bool:
        st = os.stat(self.path)
        return st.st_atime > st.st_mtime - 3600


def profile_file(tmp_path, text: str, name="device.toml") -> str:
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


# -- a file outside the portfolio is never opened -----------------------------------------------------------------
def external_data_model(location: str) -> bytes:
    """A working model whose Gemm weight ONNX Runtime would read from ``location``."""
    fw = numpy_helper.from_array(np.ones((CLASSES, 3), np.float32), "fw")
    fw.ClearField("raw_data")
    fw.data_location = TensorProto.EXTERNAL
    fw.external_data.add(key="location", value=location)
    fw.external_data.add(key="length", value=str(CLASSES * 3 * 4))
    return model(head(), [fw, HEAD_WEIGHTS[1]]).SerializeToString()


@pytest.mark.parametrize("where", ["beside", "absolute", "relative"])
def test_a_variant_with_external_data_is_refused_before_anything_reads_it(tmp_path, where):
    canary = Canary(tmp_path)
    location = {
        "beside": "canary",
        "absolute": str(canary.path),
        "relative": "../../../../" + str(canary.path).lstrip("/"),
    }[where]
    path = portfolio_of(tmp_path, {"ext": external_data_model(location), **tiny_blobs((4,))})
    for args in (["inspect", str(path)], ["bench", str(path)], ["run", str(path), "--images", str(tmp_path)]):
        refused(device_cli(*args, cwd=tmp_path), "variant 'ext'", "external data")
    with Portfolio.open(path) as pf, pytest.raises(PortfolioError, match="external data"):
        pf.inflate("ext")
    with pytest.raises(PortfolioError, match="external data"):
        Runtime(path, start="w4")
    assert not canary.read()


def test_a_profile_cannot_point_onnx_runtime_at_a_folder_of_files(tmp_path):
    """The attack that opened this: a session config entry naming the folder external data is read from."""
    canary = Canary(tmp_path)
    path = portfolio_of(tmp_path, {"ext": external_data_model("canary"), **tiny_blobs((4,))})
    device = profile_file(
        tmp_path,
        f'[execution]\nsession_config = {{ "session.model_external_initializers_file_folder_path" = "{tmp_path}" }}\n',
    )
    for args in (["bench", str(path)], ["run", str(path), "--images", str(tmp_path)]):
        refused(device_cli(*args, "--profile", device, cwd=tmp_path), "not an entry a profile may set")
    assert not canary.read()


@pytest.mark.parametrize(
    "table,phrase",
    [
        (
            '[execution]\nsession_config = { "session.model_external_initializers_file_folder_path" = "/" }\n',
            "not an entry a profile may set",
        ),
        ('[execution]\nsession_config = { "session.intra_op.allow_spinning" = "yes" }\n', "expected one of 0, 1"),
        (
            '[execution]\nproviders = ["TensorrtExecutionProvider", "CPUExecutionProvider"]\n'
            '[execution.provider_options.TensorrtExecutionProvider]\ntrt_engine_cache_path = "/etc"\n',
            "not an option a profile may set",
        ),
        ('[execution]\nproviders = ["EvilExecutionProvider"]\n', "not a provider this kit knows"),
        ("[execution]\nintra_op_threads = 100000\n", "is more than"),
        ("[benchmark]\nwarmup = 1000000000000000\n", "benchmark.warmup must be <= 10000"),
        ("[benchmark]\nmax_seconds = inf\n", "benchmark.max_seconds is out of range"),
        ("[serving]\nbatch_size = 99999999999999999999999\n", "out of range"),
        ("[limits]\nvariant_mb = 100000\n", "limits.variant_mb must be <= 2047"),
    ],
)
def test_a_profile_reaches_onnx_runtime_only_through_the_allow_list(tmp_path, table, phrase):
    path = portfolio_of(tmp_path, tiny_blobs((4, 8)))
    device = profile_file(tmp_path, table)
    for command in ("bench", "inspect"):
        refused(device_cli(command, str(path), "--profile", device, cwd=tmp_path), "device.toml", phrase)


def test_a_huge_profile_is_refused_before_it_is_parsed(tmp_path):
    device = profile_file(tmp_path, "# " + "x" * (2 * 2**20) + "\n")
    refused(device_cli("bench", "none.zip", "--profile", device, cwd=tmp_path), "larger than 1,048,576 bytes")


# -- memory: what a file declares is capped before the work -----------------------------------------------------
def test_a_variant_declaring_more_than_the_profile_allows_is_refused_before_inflating(tmp_path):
    """1.5 GB declared in the manifest and the ZIP header alike, its DEFLATE stream 1.5 MB of zeros."""
    declared = 1_500_000_000
    chunk, packer = bytes(2**24), zlib.compressobj(9, zlib.DEFLATED, -15)
    stream = b"".join(packer.compress(chunk) for _ in range(declared // len(chunk))) + packer.flush()
    blobs = tiny_blobs((4,))
    manifest = manifest_for({**blobs, "bomb": b"x"})
    entry = next(v for v in manifest["variants"] if v["name"] == "bomb")
    entry["bytes"] = declared
    manifest["variants"].sort(key=lambda v: v["bytes"])
    path = tmp_path / "bomb.zip"
    write_zip(path, manifest, {variant_file("w4"): blobs["w4"], variant_file("bomb"): b"x"})
    data = path.read_bytes()  # swap the member's one byte for the bomb's stream, sizes patched in both headers
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(variant_file("bomb"))
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    body = data[:start] + stream + data[start + info.compress_size :]
    body = bytearray(body)
    struct.pack_into("<3I", body, info.header_offset + 14, 0, len(stream), declared)
    cd = body.find(b"PK\x01\x02", start + len(stream))
    while cd >= 0:
        name_len = struct.unpack_from("<H", body, cd + 28)[0]
        if body[cd + 46 : cd + 46 + name_len] == variant_file("bomb").encode():
            struct.pack_into("<3I", body, cd + 16, 0, len(stream), declared)
        cd = body.find(b"PK\x01\x02", cd + 4)
    end = body.rfind(b"PK\x05\x06")
    shift = len(stream) - info.compress_size
    struct.pack_into("<I", body, end + 16, struct.unpack_from("<I", body, end + 16)[0] + shift)
    path.write_bytes(bytes(body))
    line = refused(
        device_cli("inspect", str(path), cwd=tmp_path),
        "variant 'bomb' declares 1,500,000,000 bytes",
        "limits.variant_mb",
    )
    assert len(line) < 300


def central_directory_copies(tmp_path, copies: int):
    """One real member and ``copies`` more central-directory entries, each naming another variant, all pointing at
    the same compressed bytes (the manifest declares them all, with the right hash)."""
    blob = tiny_classifier(4)
    names = ["w4", *[f"c{i}" for i in range(copies)]]
    path = portfolio_of(
        tmp_path,
        {"w4": blob},
        mutate=lambda m: m["variants"].extend(
            {**m["variants"][0], "name": n, "file": variant_file(n), "reference": False} for n in names[1:]
        ),
    )
    data = bytearray(path.read_bytes())
    cd = data.find(b"PK\x01\x02")
    end = data.rfind(b"PK\x05\x06")
    entries, pos, template = [], cd, None
    while pos < end:
        name_len, extra_len, comment_len = struct.unpack_from("<3H", data, pos + 28)
        size = 46 + name_len + extra_len + comment_len
        entry = bytes(data[pos : pos + size])
        if entry[46 : 46 + name_len] == variant_file("w4").encode():
            template = entry
        entries.append(entry)
        pos += size
    assert template is not None
    for n in names[1:]:
        new_name = variant_file(n).encode()
        entries.append(template[:28] + struct.pack("<H", len(new_name)) + template[30:46] + new_name)
    directory = b"".join(entries)
    tail = bytearray(data[end : end + 22])
    struct.pack_into("<HHII", tail, 8, len(entries), len(entries), len(directory), cd)
    path.write_bytes(bytes(data[:cd]) + directory + bytes(tail))
    return path


def test_many_directory_entries_sharing_one_members_bytes_are_refused(tmp_path):
    path = central_directory_copies(tmp_path, 1000)
    refused(device_cli("inspect", str(path), cwd=tmp_path), "declares 1002 members", "limits.max_variants")
    path = central_directory_copies(tmp_path, 3)
    refused(device_cli("inspect", str(path), cwd=tmp_path), "overlap in the file")


@pytest.mark.parametrize(
    "mutate,phrase",
    [
        (lambda m: m["preprocessing"].update(size=[20000, 20000]), "preprocessing.size must be the input's"),
        (lambda m: m["preprocessing"].update(size=[]), "preprocessing.size must be the input's"),
        (lambda m: m["input"].update(shape=[None, None, SIZE, SIZE]), "C, H and W fixed numbers"),
        (lambda m: m["input"].update(shape=[None, 3, 100000, 100000]), "more than 16777216 values"),
        (lambda m: m["variants"][0].update(name="w4\n"), "not a safe name"),
        (lambda m: m.update(labels=["x" * 5000] * CLASSES), "longer than 1024 characters"),
    ],
)
def test_a_manifest_cannot_make_every_image_or_warm_up_cost_gigabytes(tmp_path, mutate, phrase):
    path = portfolio_of(tmp_path, tiny_blobs((4, 8)), mutate)
    refused(device_cli("inspect", str(path), cwd=tmp_path), phrase)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that says width x height RGB; its pixel data never comes (nothing may decode that far)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(bytes(1000)))
        + chunk(b"IEND", b"")
    )


def test_an_image_is_refused_by_its_pixel_count_before_it_is_decoded(tmp_path):
    pytest.importorskip("PIL", reason="JPEG and PNG need Pillow (the [images] extra)")
    path = portfolio_of(tmp_path, tiny_blobs((4,)))
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "big.png").write_bytes(png_header_only(13_300, 13_300))
    refused(
        device_cli("run", str(path), "--images", str(tmp_path / "imgs"), cwd=tmp_path),
        "big.png: more pixels than the 40 million",
        "limits.image_megapixels",
    )


@pytest.mark.parametrize(
    "array,phrase",
    [
        (np.array([{"a": 1}, None], dtype=object), "not a plain .npy array"),
        (None, "not a plain .npy array"),  # a header claiming 10^12 bytes, the data cut short
    ],
)
def test_a_npy_image_is_never_unpickled_or_allocated_from_its_header(tmp_path, array, phrase):
    path = portfolio_of(tmp_path, tiny_blobs((4,)))
    (tmp_path / "imgs").mkdir()
    target = tmp_path / "imgs" / "x.npy"
    if array is not None:
        np.save(target, array, allow_pickle=True)
    else:
        header = "{'descr': '|u1', 'fortran_order': False, 'shape': (1000000, 1000000, 3), }"
        header += " " * (63 - len(header) % 64) + "\n"
        target.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + bytes(100))
    refused(device_cli("run", str(path), "--images", str(tmp_path / "imgs"), cwd=tmp_path), phrase)


def test_bench_results_and_traces_are_size_checked_before_parsing(tmp_path):
    path = portfolio_of(tmp_path, tiny_blobs((4, 8)))
    device = profile_file(tmp_path, "[limits]\nfile_mb = 1\n")
    (tmp_path / "evil.bench.json").write_text('{"variants": [' + "1," * 2**20 + "1]}")
    refused(
        device_cli("run", str(path), "--images", str(tmp_path), "--profile", device, cwd=tmp_path),
        "evil.bench.json: bench result larger than 1,048,576 bytes",
    )
    (tmp_path / "evil.bench.json").unlink()
    (tmp_path / "t.csv").write_text("time_s,rps\n" + "".join(f"{i},1\n" for i in range(200_000)))
    refused(
        device_cli("simulate", str(path), "--trace", str(tmp_path / "t.csv"), "--profile", device, cwd=tmp_path),
        "trace larger than 1,048,576 bytes",
    )


def loop_model() -> bytes:
    body = helper.make_graph(
        [helper.make_node("Identity", ["c"], ["c_out"]), helper.make_node("Identity", ["v"], ["v_out"])],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None),
        ],
    )
    nodes = [helper.make_node("Loop", ["", "forever", "input"], ["looped"], body=body), *head("looped")]
    return model(nodes, [numpy_helper.from_array(np.array(True), "forever"), *HEAD_WEIGHTS]).SerializeToString()


def many_initializers(count: int) -> bytes:
    unused = [numpy_helper.from_array(np.zeros(1, np.float32), f"u{i}") for i in range(count)]
    return model(head(), [*HEAD_WEIGHTS, *unused]).SerializeToString()


def memory_bomb() -> bytes:
    """2.4 GB of constants that ONNX Runtime folds while it makes the session."""
    value = helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["big"], value=value),
        helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
        helper.make_node("Add", ["input", "s"], ["x"]),
        *head("x"),
    ]
    return model(
        nodes, [numpy_helper.from_array(np.array([600_000_000], np.int64), "shape"), *HEAD_WEIGHTS]
    ).SerializeToString()


def slow_model(matmuls: int = 60) -> bytes:
    """Each call: ``matmuls`` products of 2048 x 2048 matrices, seconds on a small CPU."""
    nodes = [
        helper.make_node("Reshape", ["input", "flat"], ["r"]),
        helper.make_node("Tile", ["r", "reps"], ["q"]),
        helper.make_node("MatMul", ["q", "w1"], ["t0"]),
    ]
    nodes += [helper.make_node("MatMul", [f"t{i}", "w"], [f"t{i + 1}"]) for i in range(matmuls)]
    nodes += [
        helper.make_node("Slice", [f"t{matmuls}", "zero", "three", "one"], ["s"]),
        helper.make_node("Reshape", ["s", "image"], ["x"]),
        *head("x"),
    ]
    consts = {
        "flat": [1, -1],
        "reps": [2048, 1],
        "zero": [0],
        "three": [3 * SIZE * SIZE],
        "one": [1],
        "image": [-1, 3, SIZE, SIZE],
    }
    inits = [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in consts.items()]
    inits += [
        numpy_helper.from_array(np.eye(2048, dtype=np.float32), "w"),
        numpy_helper.from_array(np.ones((3 * SIZE * SIZE, 2048), np.float32) / 2048, "w1"),
    ]
    return model(nodes, [*inits, *HEAD_WEIGHTS]).SerializeToString()


@pytest.mark.parametrize(
    "build,phrase",
    [
        (loop_model, "uses Loop"),
        (lambda: many_initializers(25_000), "more than 20,000 initializers"),
        (
            lambda: model(
                [
                    helper.make_node(
                        "EPContext",
                        ["input"],
                        ["logits"],
                        domain="com.microsoft",
                        ep_cache_context="/etc/passwd",
                        embed_mode=0,
                    )
                ]
            ).SerializeToString(),
            "'EPContext', not one this kit allows",
        ),
        (
            lambda: model([helper.make_node("Evil", ["input"], ["logits"], domain="evil.ops")]).SerializeToString(),
            "neither standard",
        ),
        (lambda: b"\x0a\xff\xff\xff\xff\x0f" + bytes(10), "not a valid ONNX model"),
        (
            lambda: model(
                head(),
                HEAD_WEIGHTS,
                inputs=[helper.make_tensor_value_info("input", TensorProto.DOUBLE, ["N", 3, SIZE, SIZE])],
            ).SerializeToString(),
            "the manifest says 'input', float32",
        ),
    ],
)
def test_a_graph_is_read_before_onnx_runtime_sees_it(tmp_path, build, phrase):
    path = portfolio_of(tmp_path, {"evil": build(), **tiny_blobs((4,))})
    refused(device_cli("inspect", str(path), cwd=tmp_path), "variant 'evil'", phrase)


def test_what_onnx_runtime_does_with_a_graph_is_bounded_in_a_process_of_its_own(tmp_path):
    """A graph that passes every static check but folds 2.4 GB of constants, and one whose first call takes far
    longer than the profile allows: both refused, naming the variant and the limit, this process never at risk."""
    path = portfolio_of(tmp_path, {"bomb": memory_bomb(), **tiny_blobs((4,))})
    for command in (["inspect", str(path)], ["run", str(path), "--images", str(tmp_path)]):
        refused(device_cli(*command, cwd=tmp_path), "variant 'bomb' needs more than the 1536 MB", "limits.memory_mb")
    path = portfolio_of(tmp_path, {"slow": slow_model(), **tiny_blobs((4,))}, name="slow.zip")
    device = profile_file(tmp_path, "[limits]\nload_seconds = 2\n")
    for command in ("inspect", "bench"):
        refused(
            device_cli(command, str(path), "--profile", device, cwd=tmp_path),
            "variant 'slow' was not made and run once within 2 s",
            "limits.load_seconds",
        )
    with pytest.raises(PortfolioError, match="needs more than the 1536 MB"):
        Runtime(tmp_path / "evil.zip", start="w4")


def test_a_graph_onnx_runtime_refuses_is_one_line_and_inspect_fails(tmp_path):
    bad = model(
        [helper.make_node("Conv", ["input", "w"], ["logits"], kernel_shape=[9, 9])],
        [numpy_helper.from_array(np.ones((4, 5, 3, 3), np.float32), "w")],
    )
    path = portfolio_of(tmp_path, {"bad": bad.SerializeToString(), **tiny_blobs((4,))})
    for args in (["inspect", str(path)], ["bench", str(path)], ["run", str(path), "--images", str(tmp_path)]):
        refused(device_cli(*args, cwd=tmp_path), "variant 'bad'", "ONNX Runtime cannot load or run it")


# -- numbers and strings that break parsers far from the file ----------------------------------------------------
@pytest.mark.parametrize(
    "text,phrase",
    [
        ('"top1": ' + "1" * 5000, "an integer of 5000 digits"),
        ('"top1": 1e400', "a number out of range"),
        ('"top1": NaN', "NaN is not a number"),
        ('"top1": "\\ud800"', "lone UTF-16 surrogate"),
    ],
)
def test_numbers_and_strings_json_cannot_hold_are_refused(tmp_path, text, phrase):
    blobs = tiny_blobs((4, 8))
    manifest = json.dumps(manifest_for(blobs)).replace('"top1": 0.5', text, 1)
    path = tmp_path / "m.zip"
    write_zip(path, manifest.encode(), {variant_file(n): d for n, d in blobs.items()})
    refused(device_cli("inspect", str(path), cwd=tmp_path), "manifest.json is not valid JSON", phrase)
    good = portfolio_of(tmp_path, blobs, name="good.zip")
    (tmp_path / "good.bench.json").write_text(
        '{"variants": [{"name": "w4", "p50_ms": 1, "x": 1}]}'.replace('"x": 1', text)
    )
    refused(device_cli("run", str(good), "--images", str(tmp_path), cwd=tmp_path), "not a bench result", phrase)
    (tmp_path / "t.json").write_text('[{"time_s": 0, "rps": 1, "x": 1}]'.replace('"x": 1', text))
    refused(device_cli("simulate", str(good), "--trace", str(tmp_path / "t.json"), cwd=tmp_path), phrase)


def test_a_bench_result_without_variants_is_one_line(tmp_path):
    path = portfolio_of(tmp_path, tiny_blobs((4, 8)))
    (tmp_path / "evil.bench.json").write_text('{"variants": []}')
    refused(device_cli("run", str(path), "--images", str(tmp_path), cwd=tmp_path), "not a bench result (no variants)")
    with pytest.raises(InputFileError, match="no variants"):
        Runtime(path, bench={"variants": []})


@pytest.mark.parametrize(
    "rows,phrase",
    [
        ("time_s,rps\ninf,10\n", "not a finite number"),
        ("time_s,rps\n0,10\n1000000000,10\n", "windows of 1 s, more than 100,000"),
        ("time_s,rps\n0," + "9" * 5000 + "\n", "not a finite number"),
    ],
)
def test_a_trace_is_bounded_before_it_is_replayed(tmp_path, rows, phrase):
    path = portfolio_of(tmp_path, tiny_blobs((4, 8)))
    (tmp_path / "t.csv").write_text(rows)
    refused(device_cli("simulate", str(path), "--trace", str(tmp_path / "t.csv"), cwd=tmp_path), phrase)


def test_text_from_a_file_reaches_the_terminal_with_its_controls_escaped(tmp_path):
    escape = "\x1b]0;owned\x07\x1b[2J\r\u202e"
    blobs = tiny_blobs((4, 8))

    def mutate(m):
        m["dropped"] = [{"name": "gone", "reason": f"dropped{escape}"}]
        m["labels"] = [f"cat{escape}"] * CLASSES

    path = portfolio_of(tmp_path, blobs, mutate)
    shown = device_cli("inspect", str(path), cwd=tmp_path)
    assert shown.code == 0, shown.stderr
    assert "dropped\\x1b]0;owned\\x07\\x1b[2J\\x0d\\u202e" in shown.stdout
    images = tmp_path / "imgs"
    images.mkdir()
    np.save(images / "a.npy", np.zeros((SIZE, SIZE, 3), np.uint8))
    ran = device_cli("run", str(path), "--images", str(images), cwd=tmp_path)
    assert ran.code == 0 and "cat\\x1b]0;owned" in ran.stdout, ran.stderr
    for out in (shown, ran):
        assert not any(c in out.stdout + out.stderr for c in "\x1b\x07\r\u202e")
    bad_name = portfolio_of(tmp_path, blobs, lambda m: m["variants"][0].update(name="\x1b[31mred"), name="n.zip")
    line = refused(device_cli("inspect", str(bad_name), cwd=tmp_path), "not a safe name")
    assert "\x1b" not in line and "\\x1b[31mred" in line


def test_where_no_process_can_be_started_a_first_call_in_this_one_stops_at_its_deadline():
    """What the emulated Pi does (qemu-user cannot start the vetting process): the variant is made here, and its
    first call stopped by ONNX Runtime's terminate flag at ``limits.run_seconds``; twice, as one watchdog thread
    serves every call."""
    profile = cpu_profile(1)
    profile = dataclasses.replace(profile, limits=dataclasses.replace(profile.limits, run_seconds=0.5))
    graph = Graph(slow_model(), {"input": np.zeros((1, 3, SIZE, SIZE), np.float32)})
    for _ in range(2):
        with pytest.warns(RuntimeWarning, match="could not start a timing process"):
            with pytest.raises(TimingError, match="variant 'slow': one call ran past 0.5 s"):
                vet_graphs({"slow": graph}, profile, python=["sh", "-c", "exit 127", "sh"], kind="variant")
        timing_process._warned.clear()


@pytest.mark.parametrize(
    "array,phrase",
    [
        (np.array([{"x": 1}] * 4, dtype=object), "not a plain .npy array|must hold float32"),
        (np.zeros((2, 3, SIZE, SIZE), np.float64), "must hold float32"),
    ],
)
def test_shipped_check_inputs_are_read_as_plain_floats_of_the_declared_shape(tmp_path, array, phrase):
    import hashlib
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    data = buf.getvalue()[: 128 + 4 * 2 * 3 * SIZE * SIZE].ljust(128 + 4 * 2 * 3 * SIZE * SIZE, b"\0")
    blobs = tiny_blobs((4, 8))
    manifest = manifest_for(blobs)
    manifest["checks"] = {
        "file": "checks.npy",
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "count": 2,
    }
    path = tmp_path / "c.zip"
    write_zip(path, manifest, {**{variant_file(n): d for n, d in blobs.items()}, "checks.npy": data})
    line = refused(device_cli("bench", str(path), cwd=tmp_path), "checks.npy")
    assert any(p in line for p in phrase.split("|")), line
