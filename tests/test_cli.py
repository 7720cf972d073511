import subprocess
import sys


def test_umbrella_help_lists_without_torch_import():
    code = (
        "import sys; from controllers.cli import build_parser; p = build_parser(); "
        "h = p.format_help(); print(h); assert 'torch' not in sys.modules, 'CLI import pulled torch'"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "rigfm" in out.stdout
