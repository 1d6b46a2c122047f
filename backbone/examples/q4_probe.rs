fn main() {
    for _ in 0..3 {
        println!(
            "q4_1 gemv 3072x576: {:.3} ms",
            roe_backbone::q4::bench_probe() * 1e3
        );
    }
}
