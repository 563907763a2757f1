"""crosscheck: runs torch's eager fbgemm quantization and refquant side by side and compares every value.

The only package besides the tests that imports torch, and only in ``torch_model``, ``torch_study``, ``models``
and ``isa``'s probe (all run in the torch worker process, or wherever torch is already loaded):

    linear       ``python -m crosscheck.linear``: options, exit codes, output
    model        ``python -m crosscheck.model``: a whole model (built-in digits MLPs, or the user's), layer by layer
    model_study  the model study: torch's record in, refquant.model's mirror, one comparison row per field and layer
    study        the one-layer study (crosscheck.linear): the model study with its own row names and error study
    torch_model  the torch side of every study: fuse, prepare, calibrate, convert, every layer recorded
    torch_study  crosscheck.linear's model and data: QuantStub -> Linear -> DeQuantStub
    models       crosscheck.model's models and data: the digits MLP and residual MLP, the user's model
    worker       runs the torch side in a worker process (only NumPy arrays come back)
    isa          which int8 kernel family torch's fbgemm runs (a probe), and the environment of --isa
    compare      exact, bitwise comparison of two values; first difference; JSON encoding
    requantization  --requantization: integer-only variants' codes vs torch's, the differences and their causes
    report       the printed report and the JSON document (schema in ``report.JSON_SCHEMA``)
    model_report crosscheck.model's report and JSON (``model_report.JSON_SCHEMA``)
    plots        the figures of ``--plots DIR`` (matplotlib)
"""

from .from_torch import from_torch  # noqa: E402,F401  (torch model -> refquant.model; imports torch when called)
