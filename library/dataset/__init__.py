"""Datasets: subsets, images and captions, aspect-ratio buckets, masks and latent caches."""
