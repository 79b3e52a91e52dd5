"""Models of each family (SD 1.x/2.x): the family seam, loading, key conversion, saving and tiny models."""
