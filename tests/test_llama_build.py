"""The installed llama.cpp build runs on any x86-64-v3 machine, whatever CPU the test runs on
(scripts/llama-wheel.sh builds it so).

A wheel built with llama.cpp's default GGML_NATIVE=ON passed every test on the machine that built
it and died with SIGILL on a machine of the same kind with a newer CPU. So these tests do not ask
whether the build runs here: they read its machine code for instructions beyond the baseline
(AVX-512, AMX, VNNI), which a native build on an AVX-512 machine contains and a portable one does
not. A second test generates a real reply in a child process, so a crash fails the test with the
engine's message instead of killing pytest.
"""

from __future__ import annotations

import importlib.util
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from voicemesh.connectors.proof import explain

#: Registers and mnemonics that exist only beyond x86-64-v3 (AVX2, FMA, F16C, BMI2): AVX-512
#: (zmm and mask registers, EVEX-only instructions on xmm/ymm), AVX-512/AVX VNNI, BF16 and AMX.
BEYOND_BASELINE = re.compile(
    r"%zmm\d|%k[1-7]\b|\{%k|%tmm\d|\b(?:"
    r"vpternlog[dq]|vperm[it]2\w+|vpro[lr]v?[dq]|vpmovu?s?[dqw][bwd]|vpabsq|vp(?:max|min)[su]q|"
    r"vpsrav?q|vcvtu?qq2p[sd]|vcvtp[sd]2u?qq|vrndscale\w+|vrsqrt14\w+|vrcp14\w+|vgetexp\w+|"
    r"vgetmant\w+|vfixupimm\w+|vscalef\w+|vrange\w+|vreduce\w+|vpconflict\w|vplzcnt\w|"
    r"vpopcnt\w|v?p?compress\w+|v?p?expand\w+|vpdpbu?sd\w*|vpdpwss\w*|vdpbf16ps|vcvtne2?ps2bf16|"
    r"k(?:mov|and|andn|or|xor|xnor|not|shift\w+|test|ortest|add|unpck\w+)[bwdq]|"
    r"ldtilecfg|sttilecfg|tileloadd\w*|tilestored|tilezero|tilerelease|tdp\w+"
    r")\b"
)


def llama_lib_dir() -> Path:
    spec = importlib.util.find_spec("llama_cpp")
    assert spec is not None and spec.submodule_search_locations, "llama-cpp-python is missing"
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def beyond_baseline(lib: Path) -> list[str]:
    out = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", str(lib)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line.strip() for line in out.splitlines() if BEYOND_BASELINE.search(line)]


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the baseline is x86-64's")
def test_the_installed_llama_cpp_build_uses_no_instruction_beyond_x86_64_v3() -> None:
    assert shutil.which("objdump"), "objdump (binutils) is needed; it comes with gcc"
    libs = sorted({p.resolve() for p in llama_lib_dir().glob("lib*.so*")})
    assert any(p.name.startswith("libggml-cpu") for p in libs), libs
    found = {lib.name: hits for lib in libs if (hits := beyond_baseline(lib))}
    assert not found, (
        "the installed llama.cpp build uses instructions beyond x86-64-v3 and will die with "
        "SIGILL on CPUs without them; it was built for the build machine's CPU, not by "
        "scripts/llama-wheel.sh (run make clean && make install). First of them: "
        + "; ".join(f"{name}: {hits[:3]} ({len(hits)} in all)" for name, hits in found.items())
    )


def test_llama_cpp_reports_no_avx512_or_amx_at_run_time() -> None:
    """What the loaded CPU backend says it was compiled with (a second, independent reading)."""
    code = "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"
    info = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert "CPU :" in info, info
    flags = {k.strip(): v.strip() for k, _, v in (p.partition("=") for p in info.split("|"))}
    extra = sorted(k for k, v in flags.items() if v == "1" and re.search(r"AVX512|AMX|VNNI", k))
    assert not extra, f"llama.cpp was compiled with {extra}: {info.strip()}"


def test_the_llm_engine_writes_a_multi_token_reply_in_a_child_process() -> None:
    """A prompt of a few tokens is what the SIGILL build could not survive (a one-token warmup
    passed); in a child process, so a crash fails this test with the engine's own message."""
    proc = subprocess.run(
        [sys.executable, "-m", "voicemesh.connectors.proof", "llm", "smollm2"],
        input=b"{}",
        capture_output=True,
        timeout=300,
    )
    tail = proc.stderr.decode(errors="replace").splitlines()[-20:]
    assert proc.returncode == 0, explain("llama.cpp", "llm", "smollm2", proc.returncode, tail)
    summary = proc.stdout.decode()
    tokens = int(re.search(r"(\d+) tokens", summary).group(1))  # type: ignore[union-attr]
    assert tokens >= 4, summary
