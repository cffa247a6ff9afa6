"""setup.py's build decisions: OpenMP only when the compiler has it (else a single-threaded
kernel, not no C++ backend at all)."""

import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_module():
    spec = importlib.util.spec_from_file_location("fusion_kernels_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: setup() does not run
    return module


class FakeCompiler:
    """A distutils compiler whose compile fails for the arguments in ``refused``."""

    def __init__(self, refused=()):
        self.refused, self.calls = set(refused), []

    def compile(self, sources, output_dir, extra_postargs):
        self.calls.append(list(extra_postargs))
        if self.refused & set(extra_postargs):
            raise RuntimeError("unrecognized command-line option")
        return [str(Path(output_dir) / "probe.o")]

    def link_executable(self, objects, name, output_dir, extra_postargs):
        pass


def test_a_compiler_with_openmp_builds_the_threaded_kernel(setup_module):
    compiler = FakeCompiler()
    compile_args, link_args = setup_module.openmp_args(setup_module.compiler_builds(compiler))
    assert compile_args == ["-fopenmp", "-DFK_HAS_OPENMP"] and link_args == ["-fopenmp"]
    assert compiler.calls == [["-fopenmp", "-DFK_HAS_OPENMP"]]


def test_a_compiler_without_openmp_builds_it_single_threaded(setup_module, capsys):
    compiler = FakeCompiler(refused={"-fopenmp"})
    assert setup_module.openmp_args(setup_module.compiler_builds(compiler)) == ([], [])
    assert "single-threaded" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler here")
def test_the_probe_runs_the_real_compiler(setup_module):
    from setuptools._distutils.ccompiler import new_compiler
    from setuptools._distutils.sysconfig import customize_compiler

    compiler = new_compiler()
    customize_compiler(compiler)
    compiles = setup_module.compiler_builds(compiler)
    assert compiles("int main() { return 0; }\n", [])
    assert not compiles("int main() { return undeclared; }\n", [])
