"""The `corematching` model's registration with lmms-eval (entry point group "lmms_eval.models").

Kept apart from the model class so that lmms-eval can read the registration while it builds its own
registry, without importing torch, transformers or lmms-eval's model base class.
"""

MODEL_ID = "corematching"
MODEL_CLASS = "corematching.apps.integrations.lmms_eval_model.CoreMatchingLMM"


def manifest():
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS)
