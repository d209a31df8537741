"""python -m deedsr.train stage1|stage2|vae|demo|evaluate ..."""
from .cli import main

main()
