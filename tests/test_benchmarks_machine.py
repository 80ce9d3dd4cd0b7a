"""benchmarks/machine.py: what every benchmark figure says about the machine it ran on."""
from benchmarks import machine


def _cpuinfo(tmp_path, vendor):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: 26\n\n"
                    f"processor\t: 1\nvendor_id\t: {vendor}\n")
    return str(path)


def test_cpu_vendor_reads_proc_cpuinfo(tmp_path):
    assert machine.cpu_vendor(_cpuinfo(tmp_path, "AuthenticAMD")) == "AuthenticAMD"
    assert machine.cpu_vendor(str(tmp_path / "absent")) == ""


def test_torch_blas_note_only_where_mkl_runs_its_avx2_path():
    # MKL on a non-Intel CPU: the note names the vendor and the shim that lifts it.
    note = machine.torch_blas_note("AuthenticAMD", mkl=True, preload="", avx512=True)
    assert "AuthenticAMD" in note and "mkl_avx512_shim.c" in note
    # Intel, a torch without MKL, or the shim already preloaded: nothing to say.
    assert machine.torch_blas_note("GenuineIntel", mkl=True, preload="", avx512=True) == ""
    assert machine.torch_blas_note("AuthenticAMD", mkl=False, preload="", avx512=True) == ""
    assert machine.torch_blas_note("AuthenticAMD", mkl=True, preload="/tmp/libmkl_avx512.so", avx512=True) == ""
    # An AVX2-only CPU (Zen 3): AVX2 is the best kernel there is, the shim cannot help.
    assert machine.torch_blas_note("AuthenticAMD", mkl=True, preload="", avx512=False) == ""


def test_cpu_has_avx512_reads_the_flags(tmp_path):
    zen3, zen5 = tmp_path / "zen3", tmp_path / "zen5"
    zen3.write_text("vendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma\n")
    zen5.write_text("vendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw\n")
    assert not machine.cpu_has_avx512(str(zen3)) and machine.cpu_has_avx512(str(zen5))
    assert not machine.cpu_has_avx512(str(tmp_path / "missing"))


def test_machine_tag_names_a_preloaded_library(monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert "LD_PRELOAD" not in machine.machine_tag()
    monkeypatch.setenv("LD_PRELOAD", "/tmp/libmkl_avx512.so")
    assert "LD_PRELOAD='/tmp/libmkl_avx512.so'" in machine.machine_tag()
