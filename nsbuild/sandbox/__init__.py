"""Where fakeRootCommands run: the backends (nsbuild.sandbox.backends), and the scratch trees they
leave (nsbuild.sandbox.cleanup). The package itself imports nothing, so that a build that runs no
script (and only sweeps its temporary trees) does not load the namespace machinery."""
