"""One KFP component per pipeline step; each is a thin shell over one function of `fusionrank.steps`."""
