"""`python -m compress ...` — the same command line as `compress`, and what torchrun launches:

    torchrun --nproc_per_node 2 -m compress train --model resnet20 --data digits --out runs/ddp
"""

from cli import main

main(prog_name="compress")
