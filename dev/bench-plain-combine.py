"""`python -m tinylm.bench` with the MoE combine kernel switched off: the evaluation as it ran before
`kernels.moe_combine` (a gather, then the gate-weighted sum as an fp32 batched matmul), for a
before/after beside the plain command. Takes the bench's arguments:

    PYTHONPATH=lib python3 dev/bench-plain-combine.py --models falcon --modes compiled --steps 100
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lib"))

import tinylm.kernels.combine  # noqa: E402
from tinylm.bench import main  # noqa: E402

tinylm.kernels.combine.combine_fused = lambda y_SD: False  # moe_combine looks it up at each call
main(sys.argv[1:])
