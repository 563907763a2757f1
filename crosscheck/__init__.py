"""crosscheck: runs torch's eager fbgemm quantization and refquant side by side and compares every value.

The only package besides the tests that imports torch, and only in ``torch_study`` and ``isa``'s probe (both run
in the torch worker process, or wherever torch is already loaded):

    linear       ``python -m crosscheck.linear``: options, exit codes, output
    study        the study: torch's record in, refquant's run, one comparison row per field
    torch_study  the torch side: QuantStub -> Linear -> DeQuantStub, prepare, calibrate, convert, recorded
    worker       runs the torch side in a worker process (only NumPy arrays come back)
    isa          which int8 kernel family torch's fbgemm runs (a probe), and the environment of --isa
    compare      exact, bitwise comparison of two values; first difference; JSON encoding
    report       the printed report and the JSON document (schema in ``report.JSON_SCHEMA``)
    plots        the figures of ``--plots DIR`` (matplotlib)
"""

from .from_torch import from_torch  # noqa: E402,F401  (torch model -> refquant.model; imports torch when called)
