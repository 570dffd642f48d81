from nsbuild.cli import main

main()
