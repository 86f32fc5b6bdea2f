"""Search: the FBNet-style MBConv space, the weight-sharing supernet, its training,
ask/tell strategies (NSGA-II, random) and Pareto fronts. Knows no runtime."""
