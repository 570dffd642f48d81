"""Layer and Blob values, building a layer, verified copies, content fingerprints."""
