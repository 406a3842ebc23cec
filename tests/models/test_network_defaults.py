"""The network's defaults are written once: the model, the training module and checkpoint loading agree."""

import inspect

from seg.inference.checkpoint import build_network
from seg.models import NETWORK_DEFAULTS, AttentionUNet
from seg.training.module import SegmentationModule


def test_every_signature_takes_its_defaults_from_one_mapping():
    module = inspect.signature(SegmentationModule).parameters
    network = inspect.signature(AttentionUNet).parameters
    assert {k: module[k].default for k in NETWORK_DEFAULTS} == dict(NETWORK_DEFAULTS)
    assert all(network[k].default == v for k, v in NETWORK_DEFAULTS.items()
               if network[k].default is not inspect.Parameter.empty)


def test_a_checkpoint_without_network_settings_gets_the_defaults():
    # an old checkpoint's hyper-parameters may lack a setting added later: it is built with the default
    built, trained = build_network({}), SegmentationModule().model
    assert [tuple(p.shape) for p in built.parameters()] == [tuple(p.shape) for p in trained.parameters()]
