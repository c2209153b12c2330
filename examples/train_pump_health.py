"""Train the predictive-maintenance model shipped with edgeway (pump_health.onnx).

The data are the simulator's own machines (edgeway.sim.signals.MachineSignal):
healthy ones and ones with a developing bearing fault, sampled every 10 s over
three simulated hours. The label is "the fault is past a quarter of its
severity" while the machine runs. The model is a standard scaler and a
logistic regression on (vibration, bearing_temp, current): small (about 1 KB),
fast (tens of microseconds per row) and good enough to show the lifecycle;
train your own on your machines' history the same way.

Development-only dependencies (not needed to run edgeway)::

    pip install scikit-learn skl2onnx
    python examples/train_pump_health.py [--out src/edgeway/ml/models/pump_health.onnx]

The ONNX graph takes ``features``: float32 [N, 3] and gives ``label`` [N] and
``probabilities`` [N, 2] (column 1: probability of a fault).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

FEATURES = ["vibration", "bearing_temp", "current"]
THRESHOLD = 0.25


def dataset(machines: int, seconds: float, step: float, seed: int) -> tuple[list[list[float]], list[int]]:
    from edgeway.sim.signals import MachineSignal

    rng = random.Random(seed)
    x: list[list[float]] = []
    y: list[int] = []
    for i in range(machines):
        m = MachineSignal.random(rng, fault=i % 2 == 0)
        t = 0.0
        while t < seconds:
            s = m.sample(t)
            if s["running"]:
                x.append([float(s[f]) for f in FEATURES])  # type: ignore[arg-type]
                y.append(int(m.fault_severity(t) > THRESHOLD))
            t += step
    return x, y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("src/edgeway/ml/models/pump_health.onnx"))
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()

    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import classification_report
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    import numpy as np

    x, y = dataset(200, 3 * 3600, 10.0, args.seed)
    xt, yt = dataset(60, 3 * 3600, 10.0, args.seed + 1)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    model.fit(np.asarray(x, dtype=np.float32), y)
    print(classification_report(yt, model.predict(np.asarray(xt, dtype=np.float32)), digits=3))
    onx = to_onnx(
        model,
        np.zeros((1, len(FEATURES)), dtype=np.float32),
        options={id(model.steps[-1][1]): {"zipmap": False}},
        target_opset=17,
    )
    onx.graph.input[0].name = "features"
    for node in onx.graph.node:
        node.input[:] = ["features" if i == "X" else i for i in node.input]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(onx.SerializeToString())
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes), inputs {FEATURES}")


if __name__ == "__main__":
    main()
