//! The loss-curve PNG: decodes (with the `png` crate's decoder) to the expected size, shows both
//! curves, the axes and tick labels, and bad logs give errors rather than blank images.

use camelid_train::plot::{read_metrics, render_log, HEIGHT, TRAIN_COLOR, VAL_COLOR, WIDTH};
use std::path::PathBuf;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("camelid-plot-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A log in the shape `camelid train` writes: step records, validation records, a sample.
fn write_log(path: &std::path::Path, steps: u64) {
    let mut s = String::new();
    for step in 1..=steps {
        let loss = 3.0 + 2.8 * (-(step as f64) / 60.0).exp() + 0.05 * ((step * 7) % 5) as f64;
        s += &format!(
            "{{\"grad_norm\":1.0,\"loss\":{loss},\"lr\":0.001,\"step\":{step},\"step_s\":0.02,\"tokens\":{},\"tokens_per_s\":9000.0}}\n",
            step * 256
        );
        if step % 50 == 0 {
            let v = 3.1 + 2.7 * (-(step as f64) / 60.0).exp();
            s += &format!(
                "{{\"step\":{step},\"val_loss\":{v},\"val_ppl\":{}}}\n",
                v.exp()
            );
        }
        if step == 100 {
            s += "{\"sample\":\"ROMEO: what\",\"step\":100}\n";
        }
    }
    std::fs::write(path, s).unwrap();
}

fn decode(path: &std::path::Path) -> (png::OutputInfo, Vec<u8>) {
    let dec = png::Decoder::new(std::fs::File::open(path).unwrap());
    let mut r = dec.read_info().unwrap();
    let mut buf = vec![0; r.output_buffer_size()];
    let info = r.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    (info, buf)
}

#[test]
fn metrics_log_renders_a_loss_curve() {
    let d = scratch("curve");
    let log = d.join("metrics.jsonl");
    write_log(&log, 300);
    let c = read_metrics(&log).unwrap();
    assert_eq!(c.train.len(), 300);
    assert_eq!(c.val.len(), 6);
    let out = d.join("loss.png");
    render_log(&log, &out).unwrap();
    let (info, px) = decode(&out);
    assert_eq!((info.width, info.height), (WIDTH, HEIGHT));
    assert_eq!(info.color_type, png::ColorType::Rgb);
    let count = |f: &dyn Fn(&[u8]) -> bool| px.chunks_exact(3).filter(|p| f(p)).count();
    let train = count(&|p| p == TRAIN_COLOR);
    let val = count(&|p| p == VAL_COLOR);
    let black = count(&|p| p == [0, 0, 0]);
    let white = count(&|p| p == [255, 255, 255]);
    eprintln!("train {train}, val {val}, black {black}, white {white} pixels");
    assert!(train > 600, "training curve: {train} pixels");
    assert!(val > 200, "validation curve: {val} pixels");
    assert!(black > 1000, "axes and labels: {black} pixels");
    assert!(white > px.len() / 3 / 2, "background");
    // Tick labels left of the y axis and below the x axis.
    let dark_in = |x0: u32, x1: u32, y0: u32, y1: u32| {
        (y0..y1)
            .flat_map(|y| (x0..x1).map(move |x| (x, y)))
            .filter(|&(x, y)| px[3 * (y * WIDTH + x) as usize] == 0)
            .count()
    };
    assert!(dark_in(0, 60, 40, HEIGHT - 50) > 100, "y tick labels");
    assert!(
        dark_in(70, WIDTH, HEIGHT - 40, HEIGHT - 20) > 100,
        "x tick labels"
    );
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn one_step_and_flat_logs_still_render() {
    let d = scratch("tiny");
    let log = d.join("metrics.jsonl");
    std::fs::write(&log, "{\"step\":1,\"loss\":4.0}\n").unwrap();
    let out = d.join("loss.png");
    render_log(&log, &out).unwrap();
    let (info, px) = decode(&out);
    assert_eq!((info.width, info.height), (WIDTH, HEIGHT));
    assert!(px.chunks_exact(3).any(|p| p == TRAIN_COLOR));
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn bad_logs_are_clear_errors() {
    let d = scratch("bad");
    let log = d.join("metrics.jsonl");
    let out = d.join("loss.png");
    std::fs::write(&log, "{\"step\":1,\"sample\":\"x\"}\n").unwrap();
    let e = render_log(&log, &out).unwrap_err().to_string();
    assert!(e.contains("no finite loss"), "{e}");
    std::fs::write(&log, "{\"step\":1,\"loss\":4.0}\nnot json\n").unwrap();
    let e = format!("{:#}", render_log(&log, &out).unwrap_err());
    assert!(e.contains("line 2: not JSON"), "{e}");
    let e = format!(
        "{:#}",
        render_log(&d.join("missing.jsonl"), &out).unwrap_err()
    );
    assert!(e.contains("cannot read metrics log"), "{e}");
    assert!(!out.exists());
    std::fs::remove_dir_all(&d).ok();
}
