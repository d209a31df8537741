"""`python -m deedsr.engines ENGINE_DIR ...`: the same as `deedsr-export build-engines ENGINE_DIR ...`."""
from .cli import build_engines

if __name__ == "__main__":
    build_engines(prog_name="python -m deedsr.engines")
