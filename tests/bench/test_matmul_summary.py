"""The crossover summary of the masked matmul benchmarks."""

from dynasparse.bench.matmul_summary import crossover, format_summary


def test_crossover_is_the_lowest_sparsity_from_which_every_ratio_is_at_least_one():
    assert crossover({0.5: 0.7, 0.7: 1.2, 0.8: 0.9, 0.9: 2.0, 0.95: 3.0}) == 0.9
    assert crossover({0.5: 1.0, 0.9: 4.0}) == 0.5
    assert crossover({0.5: 0.5, 0.9: 0.8}) is None
    assert crossover({}) is None


def test_summary_groups_cases_and_ignores_other_families_and_errors():
    def case(sparsity, ratio, product="forward", family="matmul"):
        return {"family": family, "params": {"product": product, "layout": "unstructured", "batch": 32,
                                             "dtype": "float32", "sparsity": sparsity},
                "variants": {"dynasparse": {"ratio": ratio}} if ratio is not None else {}}

    results = [case(0.5, 0.6), case(0.9, 3.5), case(0.9, None, "sddmm"), case(0.9, 9.0, family="nn"),
               {"family": "topk", "params": {}, "variants": {}}]
    table = format_summary(results, "dynasparse")
    lines = table.splitlines()
    assert len(lines) == 4  # title, header, rule, one group
    assert "forward" in lines[3] and "0.9" in lines[3] and "0.60x" in lines[3] and "3.50x" in lines[3]
