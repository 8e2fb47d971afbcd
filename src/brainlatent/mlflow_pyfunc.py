"""MLflow pyfunc wrapper for registered brainlatent models ("models from code": nothing is pickled).

``mlflow.pyfunc.load_model("models:/brainlatent-vae@champion").predict(volumes)`` returns latents
``(B, latent_dim)`` for volumes ``(B, 1, X, Y, Z)`` (or ``(B, X, Y, Z)``) in [0, 1]; for
``brainlatent-featurenet`` it returns the FID features. Inside the project prefer
:func:`brainlatent.registry.load_model`, which gives the full model (encode, decode, sample).
"""

import json

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class BrainLatentPyfunc(PythonModel):
    def load_context(self, context):
        import torch

        from brainlatent.models.base import build_model
        from brainlatent.registry import load_weights

        with open(context.artifacts["config"]) as fh:
            meta = json.load(fh)
        if meta["family"] == "featurenet":  # not a LatentModel: predict returns its features
            from brainlatent.models.featurenet import FeatureNet

            self.model = FeatureNet(**meta["config"])
            self.model.encode = self.model.features
        else:
            self.model = build_model(meta["family"], meta["config"])
        self.model.load_state_dict(load_weights(context.artifacts["weights"]))
        self.model.eval()
        self._torch = torch

    def predict(self, context, model_input, params=None):
        torch = self._torch
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        if x.ndim == 4:
            x = x.unsqueeze(1)
        with torch.no_grad():
            return self.model.encode(x).numpy()


mlflow.models.set_model(BrainLatentPyfunc())
