"""A trial's settings: its TrainConfig comes from train.* in params plus its own configuration, as MLflow records."""

from __future__ import annotations

from pipeline.engine.train import TrainConfig
from pipeline.params import params_from_dict
from pipeline.sweep.trial import TrialSettings, recorded_feature_settings, train_config, trial_params

CONFIG = {"dataset": "FashionMNIST", "shots": 2, "seed": 3, "n_ctx": 4, "ctx_init": "", "csc": True,
          "class_token_position": "middle", "lr": 0.01, "epochs": 7, "precision": "bf16"}
TRAIN = {"lr": 0.5, "momentum": 0.8, "weight_decay": 1e-3, "epochs": 99, "warmup_epochs": 2, "warmup_lr": 1e-4,
         "batch_size": 16, "eval_every": 3, "precision": "fp32", "device": "cpu", "shared_prefix": False,
         "pack_tokens": True, "cuda_graph": False}
FEATURES = {"views": 3, "views_per_seed": False, "dtype": "fp32", "seed": 5, "online_workers": 2, "dir": "x",
            "batch_size": 64}


def test_train_config_is_train_params_with_the_trials_own_settings() -> None:
    params = params_from_dict({"train": TRAIN})
    # The reference: every TrainConfig field written out by hand.
    expected = TrainConfig(lr=0.01, momentum=0.8, weight_decay=1e-3, epochs=7, warmup_epochs=2, warmup_lr=1e-4,
                           batch_size=16, eval_every=3, precision="bf16", seed=3, shared_prefix=False,
                           pack_tokens=True, cuda_graph=False)
    assert train_config(params.train, CONFIG) == expected
    assert train_config(params_from_dict({}).train, CONFIG) == TrainConfig(lr=0.01, epochs=7, precision="bf16", seed=3)


def test_mlflow_params_record_the_shared_train_and_feature_settings() -> None:
    params = params_from_dict({"train": TRAIN, "features": FEATURES})
    settings = TrialSettings("s", "coop-tiny", None, "fp", params.train, "", "", "", "", {},
                             recorded_feature_settings(params.features))
    logged = trial_params(CONFIG, settings)
    assert {k: v for k, v in logged.items() if k.startswith("train.")} == {
        "train.momentum": 0.8, "train.weight_decay": 1e-3, "train.warmup_epochs": 2, "train.warmup_lr": 1e-4,
        "train.batch_size": 16, "train.eval_every": 3, "train.shared_prefix": False, "train.pack_tokens": True,
        "train.cuda_graph": False}
    assert {k: v for k, v in logged.items() if k.startswith("features.")} == {
        "features.views": 3, "features.views_per_seed": False, "features.dtype": "fp32", "features.seed": 5,
        "features.online_workers": 2}
    assert {k: logged[k] for k in CONFIG} == CONFIG and logged["n_ctx_effective"] == 4
    assert logged["backbone.arch"] == "coop-tiny" and logged["backbone.pretrained"] is None
