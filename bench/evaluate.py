"""Every row's model judged the same way: on the test split, once, in the session of the row's target.

For a model file and a target name, :meth:`Evaluator.run` gives

* the task loss and metrics on the test split (the loss the benchmark model declares: ``ce`` or ``lm``);
* the KL divergence to the FP32 model's outputs on the same inputs, mean per position
  (``llc_onnx.calib.losses.FidelityLoss``: exactly what ``--objective fidelity`` verifies), and the top-1
  agreement with the FP32 model — both need no labels;

in the session the target's verdict uses (:func:`target_session`, ``llc_onnx.targets``): ``ort-cpu`` a default
ONNX Runtime CPU session (MatMulNBits nodes carry their own accuracy level), ``qdq`` CPU with MatMulNBits at
accuracy level 0 (exact Q/DQ semantics), ``tensorrt`` TensorRT where installed, else its CPU reference session.
The FP32 outputs (the teacher of the KL column) come from a default CPU session.
"""

from __future__ import annotations

FP_TARGET = "ort-cpu"  # the session FP32 and ONNX Runtime's own quantizers are judged in


def target_session(name: str, threads: int = 0):
    """``(SessionConfig, note)``: the verdict session of target ``name`` as ``optimize`` makes it; ``note`` says
    when the target's own runtime is not installed and its reference session is used instead."""
    from llc_onnx.ort_eval import SessionConfig
    from llc_onnx.targets import SessionSettings, get_target

    target = get_target(name)
    settings = target.session()
    note = None
    if not settings.available():
        fallback = getattr(target, "reference_session", None)
        settings = fallback() if fallback else SessionSettings(
            providers=(("CPUExecutionProvider", ()),), config=settings.config,
            description="ONNX Runtime CPU (the target's own provider is not installed)")
        note = f"{name} runtime not installed: judged in {settings.description}"
    return SessionConfig.of_target(settings, threads), note


class Evaluator:
    """The test split of one benchmark model, with the FP32 model's outputs on it."""

    def __init__(self, fp_path: str, test_path: str, loss_kind: str, batch_size: int, threads: int = 0):
        from llc_onnx.calib.data import load_dataset
        from llc_onnx.calib.losses import fidelity_loss_for, make_loss
        from llc_onnx.model_io import load_model
        from llc_onnx.ort_eval import make_session, resolve_output

        model = load_model(str(fp_path))
        output = resolve_output(model, None)
        self.loss = make_loss(loss_kind, output)
        rank = next((len(o.type.tensor_type.shape.dim) for o in model.graph.output if o.name == output), None)
        self.fidelity = fidelity_loss_for(loss_kind, output, rank)
        self.test = load_dataset(str(test_path), model, batch_size=batch_size)
        self.threads = threads
        fp_session, _ = target_session(FP_TARGET, threads)
        sess = make_session(str(fp_path), fp_session)
        self.fp_outputs = [sess.run([output], b.inputs)[0] for b in self.test.batches]

    def run(self, path: str, target: str = FP_TARGET) -> dict:
        """Test loss / metrics, KL to FP32, FP32 top-1 agreement of ``path`` in ``target``'s session."""
        from llc_onnx.calib.losses import accumulate
        from llc_onnx.ort_eval import make_session

        config, note = target_session(target, self.threads)
        sess = make_session(str(path), config)
        s_task, c_task, msums, s_kl, c_kl, agree = 0.0, 0, {}, 0.0, 0, {}
        for batch, ref in zip(self.test.batches, self.fp_outputs):
            out = sess.run([self.loss.output], batch.inputs)[0]
            labels = self.loss.batch_labels(batch, self.test.source)
            s, c = self.loss.loss_sum(out, labels)
            s_task, c_task = s_task + s, c_task + c
            accumulate(msums, self.loss.metrics(out, labels))
            s, c = self.fidelity.loss_sum(out, ref)
            s_kl, c_kl = s_kl + s, c_kl + c
            accumulate(agree, self.fidelity.metrics(out, ref))
        loss, metrics = self.loss.summarize(s_task, c_task, msums)
        a = agree.get("agree")
        return {"test_loss": loss, "test_metrics": metrics, "test_n": self.test.n_samples,
                "kl_fp": s_kl / c_kl if c_kl else float("nan"),
                "agree_fp_top1": a[0] / a[1] if a and a[1] else None,
                "session": config.description, **({"session_note": note} if note else {})}

