"""Network modules behind sd-scripts' ``--network_module`` interface (``networks.lora``)."""
