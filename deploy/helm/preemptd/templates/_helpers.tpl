{{- define "preemptd.labels" -}}
app.kubernetes.io/name: preemptd
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "preemptd.selector" -}}
app.kubernetes.io/name: preemptd
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
