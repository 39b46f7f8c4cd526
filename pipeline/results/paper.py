"""The paper's published numbers (no heavy imports: the benchmarks use them too)."""

# Brekelmans et al. 2019, Table 2: test (R, D, -ELBO) in nats per data set and method.
PAPER_TABLE_2: dict[str, dict[str, tuple[float, float, float]]] = {
    "binary_mnist": {
        "echo": (26.8, 61.9, 88.7), "vae": (25.9, 67.7, 93.6), "infovae": (25.6, 67.1, 92.7),
        "vae-vamp": (26.0, 67.4, 92.9), "vae-maf": (26.8, 65.8, 92.6),
        "iaf-prior": (25.6, 64.9, 90.5), "iaf-mmd": (26.0, 64.1, 90.1),
        "iaf-vamp": (25.7, 64.1, 89.8), "iaf-maf": (26.6, 63.5, 90.1)},
    "omniglot": {
        "echo": (30.5, 83.6, 114.1), "vae": (29.6, 91.4, 121.0), "infovae": (30.1, 89.4, 119.4),
        "vae-vamp": (29.5, 91.1, 120.6), "vae-maf": (28.3, 92.4, 120.7),
        "iaf-prior": (30.5, 86.9, 117.4), "iaf-mmd": (30.9, 85.8, 116.7),
        "iaf-vamp": (30.0, 86.5, 116.5), "iaf-maf": (31.5, 84.6, 116.1)},
    "fashion_mnist": {
        "echo": (16.2, 218.5, 234.7), "vae": (14.7, 221.9, 236.6), "infovae": (15.8, 220.6, 236.3),
        "vae-vamp": (13.9, 222.7, 236.6), "vae-maf": (14.6, 221.8, 236.4),
        "iaf-prior": (16.0, 218.7, 234.7), "iaf-mmd": (15.9, 218.5, 234.4),
        "iaf-vamp": (15.4, 219.1, 234.5), "iaf-maf": (16.1, 218.2, 234.3)},
}
