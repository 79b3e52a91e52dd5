"""``--network_module networks.loha``: networks.lora with ``algo=loha`` (LyCORIS's LoHa keys and math).

The module name kohya_ss and sd-scripts users know; every network arg of networks.lora applies.
"""

from __future__ import annotations

from networks.lora import create_network_from_weights, network_with_algo

__all__ = ["create_network", "create_network_from_weights"]


def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout=None, **kwargs):
    """A LoHa network from sd-scripts' flags and ``--network_args``."""
    return network_with_algo(
        "loha", multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout, kwargs
    )
