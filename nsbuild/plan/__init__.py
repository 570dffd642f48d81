"""Contents -> store closure -> ordered layer plan within maxLayers."""
