from stages.data.stage import main

main()
