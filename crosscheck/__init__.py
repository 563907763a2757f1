"""crosscheck: runs torch's eager quantization (every CPU engine, static and dynamic) and refquant side by side
and compares every value.

The only package besides the tests that imports torch, and only in ``torch_model``, ``torch_study``,
``torch_dynamic``, ``torch_engines_study``, ``models``, ``from_torch`` (when called) and ``isa``'s probe (all run in
the torch worker process, or wherever torch is already loaded):

    linear       ``python -m crosscheck.linear``: options, exit codes, output
    model        ``python -m crosscheck.model``: a whole model (built-in digits MLPs, or the user's), layer by layer
    model_study  the model study: torch's record in, refquant.model's mirror, one comparison row per field and layer
    dynamic      ``python -m crosscheck.linear --dynamic``: quantize_dynamic's Linear against DynamicQuantizedLinear
    dynamic_study   the dynamic study's rows; torch_dynamic its torch side
    engines      ``python -m crosscheck.engines``: one layer through every static engine, and why the engines differ
    engines_study   its rows and the attribution chain; torch_engines_study its torch side
    explain      ``python -m crosscheck.explain GOLDEN THEIRS``: which arithmetic another port's codes follow
    from_torch   a torch eager model (float or converted) read into refquant.model without recalibrating
    study        the one-layer study (crosscheck.linear): the model study with its own row names and error study
    torch_model  the torch side of every study: fuse, prepare, calibrate, convert, every layer recorded
    torch_study  crosscheck.linear's model and data: QuantStub -> Linear -> DeQuantStub
    models       crosscheck.model's models and data: the digits MLP and residual MLP, the user's model
    runner       what every CLI shares: the torch-side process, the perturber, the option checks, emitting output
    torch_record what the torch side records (NumPy arrays and plain values only)
    progress     progress lines on stderr for long phases
    worker       runs the torch side in a worker process (only NumPy arrays come back)
    isa          which int8 kernel family torch's fbgemm runs (a probe), and the environment of --isa
    compare      exact, bitwise comparison of two values; first difference; JSON encoding
    requantization  --requantization: integer-only variants' codes vs torch's, the differences and their causes
    report       the printed report and the JSON document (schema in ``report.JSON_SCHEMA``)
    model_report crosscheck.model's report and JSON (``model_report.JSON_SCHEMA``)
    plots        the figures of ``--plots DIR`` (matplotlib)
"""

from .from_torch import from_torch  # noqa: E402,F401  (torch model -> refquant.model; imports torch when called)
