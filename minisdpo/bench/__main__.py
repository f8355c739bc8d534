from minisdpo.bench import main

main()
