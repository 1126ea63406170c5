"""How closely two fp32 computations of the served model must agree in tests, from the toolkit's own
statement rather than from this machine's BLAS.

The same model run on another batch shape (one image alone, the image inside a dynamic batch), or in
another fp32 runtime, sums in another order, so its logits differ by float32 rounding: how much
depends on the BLAS and the CPU (AVX2 or AVX-512 kernels, FMA, blocking). Export holds every fp32
format to ``FP32_PARITY.atol`` on logits at batch sizes 1 and 10,000, on any machine, so that is the
logits tolerance. Softmax moves each probability by at most half the largest logit change (its
Jacobian's rows sum to 2 p (1 - p) <= 1/2 in absolute value), hence half of it for probabilities.
Another image's answers differ by far more (other digits: order 1), so mixed-up answers still fail.
"""

from mnist_deploy.formats import FP32_PARITY

LOGITS_ATOL = FP32_PARITY.atol
PROBABILITIES_ATOL = FP32_PARITY.atol / 2
