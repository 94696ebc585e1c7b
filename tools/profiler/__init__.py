"""The rich terminal profiler behind `streamspec profile` and `streamspec report`.

    collect.py   runs a profile: generations, device measurements, ORT's profiler -> report
    figures.py   the report's figures from per-step records (plain functions of plain data)
    measure.py   device measurements: copy bandwidth, memory, system, step-latency curve
    trace.py     ONNX Runtime's profiler trace -> the most expensive operators
    live.py      the live view while generating
    report.py    saving, loading and rendering a report
    charts.py    sparklines and bars as text

Imports numpy, onnxruntime and rich only (never torch), so it runs on the device.
"""
